"""The engine hands out deltas; accumulated, they equal what whole-text processing gives.

A sequence's deltas must concatenate to its final text and tokens, never show text
that a stop string later cuts, and hold no history: the accumulator (not the engine)
keeps whole outputs, in the shape each ``output_kind`` asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.engine.sequence import ParentRequest, SequenceState, make_detokenizer
from kvrun.outputs import Logprob, RequestMetrics, RequestOutputKind
from kvrun.sampling.stop import find_stop
from kvrun.sampling_params import SamplingParams
from kvrun.tokenizer import Tokenizer, load_tokenizer_from_dir
from tests.support.engine import make_engine, run_all

TEXTS = [
    "Hello world, this is a test of stop strings. END of it",
    "Caf\u00e9 \u6f22\u5b57 and emoji \U0001f600 then ### more text ###",
    "no stop here at all, just words and words",
]
STOPS = [["END"], ["###", "emoji"], ["\n\n"], ["world, this is a very long stop"], []]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir: Path) -> Tokenizer:
    return load_tokenizer_from_dir(smollm2_hf_dir)


def _parent(tokenizer: Tokenizer, params: SamplingParams) -> ParentRequest:
    prompt = tokenizer.encode("Say something:")
    parent = ParentRequest("r", None, prompt, params, RequestMetrics(arrival_time=0.0))
    for index in range(params.n):
        parent.sequences.append(
            SequenceState(
                parent=parent,
                index=index,
                params=params,
                generator=None,
                detokenizer=make_detokenizer(tokenizer, prompt, params),
                bad_words_ids=[],
                eos_token_ids=frozenset(),
            )
        )
    return parent


def _whole_text_reference(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> str:
    """The text a stop-aware reader of the whole decoded output ends with."""
    text = ""
    for i in range(1, len(ids) + 1):
        now = tokenizer.decode(ids[:i])
        new = len(now) - len(text)
        text = now
        match = find_stop(text, new, params.stop_strings, params.include_stop_str_in_output)
        if match is not None:
            return match.text
    return text


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stops", STOPS)
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_whole_text_reference(
    tokenizer: Tokenizer, text: str, stops: list[str], include: bool
) -> None:
    params = SamplingParams(stop=stops, include_stop_str_in_output=include, logprobs=1)
    ids = tokenizer.encode(text, add_special_tokens=False)
    parent = _parent(tokenizer, params)
    seq = parent.sequences[0]
    streamed, tokens, logprobs = [], [], []
    for position, token in enumerate(ids):
        stop = seq.add_token(token, {token: Logprob(-0.5 - position, 1)})
        if stop is not None:
            seq.finish("stop", stop)
        elif position == len(ids) - 1:
            seq.finish("length", None)
        delta = parent.take_delta()
        (part,) = delta.sequences
        streamed.append(part.text)
        tokens += part.token_ids
        assert part.logprobs is not None and len(part.logprobs) == len(part.token_ids) == 1
        logprobs += part.logprobs
        assert part.cumulative_logprob == pytest.approx(sum(-0.5 - i for i in range(len(tokens))))
        # Nothing streamed is ever cut later: the streamed text is a prefix of the final.
        assert _whole_text_reference(tokenizer, ids, params).startswith("".join(streamed))
        if stop is not None:
            break
    assert "".join(streamed) == _whole_text_reference(tokenizer, ids, params)
    assert tokens == ids[: len(tokens)] and len(logprobs) == len(tokens)
    assert delta.finished and not seq.changed
    # The engine kept no history of text or logprobs it handed out.
    assert seq.pending_logprobs == [] and len(seq.unsent) <= len(max(stops or [""], key=len))


def test_a_held_back_stop_prefix_is_released_when_it_turns_out_not_to_be_one(
    tokenizer: Tokenizer,
) -> None:
    params = SamplingParams(stop=["world peace"])
    parent = _parent(tokenizer, params)
    seq = parent.sequences[0]
    shown = []
    for token in tokenizer.encode("hello world order", add_special_tokens=False):
        seq.add_token(token, None)
        shown.append(parent.take_delta().sequences[0].text)
    assert "".join(shown) == "hello world order"
    assert "world" not in "".join(shown[:-1])  # " world" waited for what followed it
    seq.finish("length", None)
    last = parent.take_delta()
    assert last.finished and last.sequences[0].text == "" and last.sequences[0].token_ids == []


def test_prompt_logprobs_are_sent_once_when_complete(tokenizer: Tokenizer) -> None:
    parent = _parent(tokenizer, SamplingParams(prompt_logprobs=1, n=2))
    prompt_len = len(parent.prompt_token_ids)
    parent.prompt_logprobs = [None]
    assert parent.take_delta().prompt_logprobs is None  # not complete yet
    parent.prompt_logprobs += [{1: Logprob(-1.0, 1)}] * (prompt_len - 1)
    parent.sequences[1].add_token(5, None)
    first = parent.take_delta()
    assert first.prompt_logprobs == parent.prompt_logprobs
    assert [s.index for s in first.sequences] == [1] and first.num_sequences == 2
    parent.sequences[0].add_token(6, None)
    assert parent.take_delta().prompt_logprobs is None


@pytest.fixture(scope="module")
def real_engine(random_checkpoint: Any) -> LLMEngine:
    """One engine for every output kind: each request is seeded, so it repeats exactly."""
    return make_engine(random_checkpoint("llama", seed=0), num_kv_blocks=64, max_model_len=256)


@pytest.mark.parametrize(
    "kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY]
)
def test_output_kinds_from_a_real_engine(real_engine: LLMEngine, kind: RequestOutputKind) -> None:
    engine = real_engine
    params = SamplingParams(
        n=2, seed=3, temperature=1.0, max_tokens=7, logprobs=2, ignore_eos=True, output_kind=kind
    )
    engine.add_request(engine.new_request_id(), [1, 5, 9, 200, 33], params)
    accumulator = OutputAccumulator()
    outputs = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None:
                outputs.append(out)
    # The same request, accumulated the default way, is the reference.
    (want,) = run_all(engine, [[1, 5, 9, 200, 33]], params.replace(output_kind=0))
    final = outputs[-1]
    assert final.finished and all(not o.finished for o in outputs[:-1])
    if kind is RequestOutputKind.FINAL_ONLY:
        assert len(outputs) == 1
    if kind is RequestOutputKind.DELTA:
        for index in range(2):
            parts = [c for o in outputs for c in o.outputs if c.index == index]
            assert [t for c in parts for t in c.token_ids] == want.outputs[index].token_ids
            assert "".join(c.text for c in parts) == want.outputs[index].text
            assert sum(len(c.logprobs or []) for c in parts) == 7
            assert parts[-1].cumulative_logprob == pytest.approx(
                want.outputs[index].cumulative_logprob
            )
    else:
        assert len(outputs) == (1 if kind is RequestOutputKind.FINAL_ONLY else 7)
        for got, expected in zip(final.outputs, want.outputs, strict=True):
            assert (got.token_ids, got.text) == (expected.token_ids, expected.text)
            assert got.logprobs == expected.logprobs
        if kind is RequestOutputKind.CUMULATIVE:
            # Each output holds everything so far: token counts grow by one a step.
            assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 8))
