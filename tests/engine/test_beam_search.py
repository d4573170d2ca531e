"""Beam search (``LLM.beam_search``, issue 14 part 5) against transformers' beam search on
the same weights (float32): the returned token sequences, in order, and their cumulative
logprobs; on a random tiny Llama (no beam ends early) and on SmolLM2 (beams end at EOS,
scored with the length penalty). Beams share their prompt's KV blocks through the
prefix cache: the block manager's counters and the block tables of each step say so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import kvrun
from kvrun import LLM
from kvrun.beam_search import BeamSearch, BeamSearchOutput, beam_score
from kvrun.engine.beam_search import run_beam_search
from kvrun.engine.llm_engine import LLMEngine
from kvrun.errors import RequestError
from kvrun.outputs import Logprob
from kvrun.sampling_params import BeamSearchParams
from tests.support.checkpoints import cached_build
from tests.support.engine import make_engine

RANDOM = {"seed": 3, "init_std": 0.2}  # peaked enough that the beams disagree with greedy
RANDOM_PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 140))]
SMOLLM2_QUESTIONS = ["What is 2+2? Answer with one number.", "Say hi."]
EOS = 2  # SmolLM2's <|im_end|>, the only EOS id of both checkpoints


# --- the reference -----------------------------------------------------------------------


def hf_beam_search(
    model_dir: Path, prompts: Sequence[list[int]], k: int, length_penalty: float, max_new: int
) -> list[list[tuple[list[int], float]]]:
    """transformers' ``generate(num_beams=k, num_return_sequences=k, do_sample=False,
    early_stopping="never")`` per prompt: each sequence's generated ids (through its EOS)
    and cumulative logprob, best first; cached on disk like the greedy references."""
    key = {
        "model": str(model_dir),
        "prompts": [list(p) for p in prompts],
        "k": k,
        "length_penalty": length_penalty,
        "max_new": max_new,
    }

    def build(out: Path) -> Path:
        result = _hf_beam_search(model_dir, prompts, k, length_penalty, max_new)
        (out / "reference.json").write_text(json.dumps(result))
        return out

    path = cached_build("hf-beam-search", key, build) / "reference.json"
    return [[(list(ids), float(cum)) for ids, cum in seqs] for seqs in json.loads(path.read_text())]


@torch.inference_mode()
def _hf_beam_search(
    model_dir: Path, prompts: Sequence[list[int]], k: int, length_penalty: float, max_new: int
) -> list[list[tuple[list[int], float]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    result = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=k,
            num_return_sequences=k,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping="never",  # exact beam search: no heuristic cut-off
            max_new_tokens=max_new,
            eos_token_id=EOS,
            pad_token_id=EOS,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seqs = []
        for ids, score in zip(out.sequences, out.sequences_scores.tolist(), strict=True):
            generated = ids[len(prompt) :].tolist()
            if EOS in generated:  # padded with EOS after the first one
                generated = generated[: generated.index(EOS) + 1]
            # sequences_scores is cum_logprob / len ** length_penalty (EOS counted)
            seqs.append((generated, score * len(generated) ** length_penalty))
        result.append(seqs)
    return result


def assert_matches(
    outputs: list[BeamSearchOutput],
    reference: list[list[tuple[list[int], float]]],
    prompts: Sequence[list[int]],
) -> None:
    assert len(outputs) == len(reference)
    for out, ref, prompt in zip(outputs, reference, prompts, strict=True):
        assert [s.generated_token_ids for s in out.sequences] == [ids for ids, _ in ref]
        for seq, (ids, cum) in zip(out.sequences, ref, strict=True):
            assert seq.tokens == [*prompt, *ids]
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert seq.cum_logprob == pytest.approx(
                sum(seq.logprobs[i][t].logprob for i, t in enumerate(ids)), abs=1e-5
            )
            assert seq.finish_reason == ("stop" if ids[-1] == EOS else "length")


# --- engines -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_llama(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", **RANDOM)


@pytest.fixture(scope="module")
def random_engine(random_llama: Path) -> Iterator[LLMEngine]:
    yield make_engine(random_llama, {"VLLM_CPU_KVCACHE_SPACE": "0.25"})


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_hf_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for q in SMOLLM2_QUESTIONS
    ]


# --- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_random_llama_equals_transformers(
    random_engine: LLMEngine, random_llama: Path, k: int, length_penalty: float
) -> None:
    params = BeamSearchParams(beam_width=k, max_tokens=8, length_penalty=length_penalty)
    outputs = run_beam_search(random_engine, RANDOM_PROMPTS, params)
    reference = hf_beam_search(random_llama, RANDOM_PROMPTS, k, length_penalty, 8)
    assert_matches(outputs, reference, RANDOM_PROMPTS)
    # the search is not greedy decoding: some returned beam leaves the greedy path
    assert len({tuple(s.tokens) for s in outputs[0].sequences}) == k


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_hf_dir: Path) -> Iterator[LLMEngine]:
    yield make_engine(smollm2_hf_dir, {"VLLM_CPU_KVCACHE_SPACE": "0.25"}, max_model_len=512)


@pytest.mark.parametrize(("k", "length_penalty"), [(2, 1.0), (4, 1.0), (4, -1.0)])
def test_smollm2_equals_transformers_with_eos(
    smollm2_engine: LLMEngine,
    smollm2_hf_dir: Path,
    smollm2_prompts: list[list[int]],
    k: int,
    length_penalty: float,
) -> None:
    engine = smollm2_engine
    params = BeamSearchParams(beam_width=k, max_tokens=12, length_penalty=length_penalty)
    outputs = run_beam_search(engine, smollm2_prompts, params)
    reference = hf_beam_search(smollm2_hf_dir, smollm2_prompts, k, length_penalty, 12)
    assert_matches(outputs, reference, smollm2_prompts)
    reasons = {s.finish_reason for out in outputs for s in out.sequences}
    assert "stop" in reasons  # beams ended at EOS and were ranked against longer ones
    # the text holds the prompt and the generation, without the EOS unless asked for
    seq = next(s for s in outputs[0].sequences if s.finish_reason == "stop")
    assert seq.text == engine.tokenizer.decode(seq.tokens[:-1], skip_special_tokens=False)
    keep = BeamSearchParams(
        beam_width=k, max_tokens=12, length_penalty=length_penalty, include_stop_str_in_output=True
    )
    [kept, _] = run_beam_search(engine, smollm2_prompts, keep)
    seq = next(s for s in kept.sequences if s.finish_reason == "stop")
    assert seq.text == engine.tokenizer.decode(seq.tokens, skip_special_tokens=False)


# --- shared prompt blocks ----------------------------------------------------------------


class _Recorder:
    """The engine's own runner, recording each step's scheduled chunks."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.steps: list[list[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def execute(self, chunks: Any, *args: Any, **kwargs: Any) -> Any:
        self.steps.append(list(chunks))
        return self.runner.execute(chunks, *args, **kwargs)


def test_beams_share_their_prompt_blocks(random_llama: Path) -> None:
    engine = make_engine(random_llama, {"VLLM_CPU_KVCACHE_SPACE": "0.25"}, block_size=16)
    recorder = _Recorder(engine.runner)
    engine.runner = recorder
    prompt = list(range(200, 244))  # 44 tokens: two full blocks, a third fills at step 4
    k, steps = 2, 8
    params = BeamSearchParams(beam_width=k, max_tokens=steps, ignore_eos=True)
    [out] = run_beam_search(engine, [prompt], params)
    assert [len(s.generated_token_ids) for s in out.sequences] == [steps] * k

    # Step t (t >= 1) runs k requests of 44 + t tokens; each finds the full blocks its
    # parent's request computed (44 + t - 1 tokens) and computes only what follows.
    hits = [k * ((44 + t - 1) // 16) * 16 for t in range(1, steps)]
    queries = 44 + sum(k * (44 + t) for t in range(1, steps))
    stats = engine.stats().scheduler
    assert stats.prefix_cache_hits == sum(hits) == k * (32 * 4 + 48 * 3)
    assert stats.prefix_cache_queries == queries

    assert len(recorder.steps) == steps
    [first] = recorder.steps[0]
    assert first.start_position == 0 and len(first.token_ids) == 44
    prompt_blocks = first.block_ids[:2]
    for t, chunks in enumerate(recorder.steps[1:], start=1):
        assert len(chunks) == k  # the beams run batched, one request each
        cached = ((44 + t - 1) // 16) * 16
        for chunk in chunks:
            # the same physical blocks hold the prompt for every beam
            assert chunk.block_ids[:2] == prompt_blocks
            assert chunk.start_position == cached
            assert len(chunk.token_ids) == 44 + t - cached
    assert engine.scheduler.block_manager.num_used_blocks == 0  # all released


# --- the search itself -------------------------------------------------------------------


def _candidates(*pairs: tuple[int, float]) -> dict[int, Logprob]:
    return {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(pairs, start=1)}


def test_an_eos_below_the_best_k_does_not_finish_a_beam() -> None:
    """transformers' rule (vLLM keeps such a candidate): an EOS candidate ranked below the
    best beam_width of a step's 2 * beam_width is only a backup, never a result."""
    search = BeamSearch([7], BeamSearchParams(beam_width=2, max_tokens=2), {EOS})
    search.advance([_candidates((10, -0.1), (11, -0.2), (EOS, -0.3), (12, -9.0))])
    assert [b.tokens for b in search.running] == [[7, 10], [7, 11]]
    assert not search.finished
    search.advance(
        [_candidates((20, -5.0), (21, -6.0), (22, -7.0)), _candidates((30, -1.0), (EOS, -1.5))]
    )
    assert search.done
    best = search.result()
    # at max_tokens the best two of the step end with "length"; the EOS ranks second
    assert [b.generated_token_ids for b in best] == [[11, 30], [11, EOS]]
    assert [b.finish_reason for b in best] == ["length", "stop"]
    assert best[1].cum_logprob == pytest.approx(-1.7)


def test_length_penalty_ranks_finished_beams() -> None:
    assert beam_score(-6.0, 3, 1.0) == pytest.approx(-2.0)
    assert beam_score(-6.0, 3, 0.0) == pytest.approx(-6.0)
    assert beam_score(-6.0, 4, 2.0) == pytest.approx(-6.0 / 16)
    # a short EOS beam (-1.2 over 1 token) loses to a long one (-2.0 over 4) at penalty 1
    search = BeamSearch([7], BeamSearchParams(beam_width=1, max_tokens=4), {EOS})
    search.advance([_candidates((EOS, -1.2), (10, -1.3))])
    assert search.finished and not search.done  # -1.3 / 4 could still beat -1.2
    for _ in range(3):
        search.advance([_candidates((10, -0.2), (11, -3.0))])
    [best] = search.result()
    assert best.generated_token_ids == [10, 10, 10, 10]
    assert best.cum_logprob == pytest.approx(-1.9)
    # at penalty 0 the EOS beam's -1.2 wins, and the search stops at once
    search = BeamSearch(
        [7], BeamSearchParams(beam_width=1, max_tokens=4, length_penalty=0.0), {EOS}
    )
    search.advance([_candidates((EOS, -1.2), (10, -1.3))])
    assert search.done
    assert search.result()[0].generated_token_ids == [EOS]


# --- params and the offline API ----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2.0, "max_tokens": 4}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": math.inf}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "length_penalty": math.nan}, "length_penalty"),
        ({"beam_width": 2, "max_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"beam_width": 2, "max_tokens": 4, "ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_params_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError, match=f"^{param}=.*accepted: ") as info:
        BeamSearchParams(**fields)
    assert info.value.param == param


def test_exported_where_vllm_users_import_it() -> None:
    from kvrun.sampling_params import BeamSearchParams as FromModule

    assert kvrun.BeamSearchParams is FromModule is BeamSearchParams
    assert "BeamSearchParams" in kvrun.__all__


def test_llm_beam_search(random_llama: Path, random_engine: LLMEngine) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CONFIGURE_LOGGING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
        llm = LLM(model=str(random_llama), dtype="float32", max_model_len=64)
    params = BeamSearchParams(beam_width=2, max_tokens=5)
    text = llm.get_tokenizer().decode(RANDOM_PROMPTS[0], skip_special_tokens=False)
    forms: list[Any] = [
        RANDOM_PROMPTS[0],
        {"prompt_token_ids": RANDOM_PROMPTS[0]},
        [RANDOM_PROMPTS[0], RANDOM_PROMPTS[1]],
    ]
    expected = run_beam_search(random_engine, RANDOM_PROMPTS, params)
    for form in forms:
        outs = llm.beam_search(form, params)
        for out, want in zip(outs, expected, strict=False):
            assert [s.tokens for s in out.sequences] == [s.tokens for s in want.sequences]
            assert [s.text for s in out.sequences] == [s.text for s in want.sequences]
    [by_text] = llm.beam_search({"prompt": text}, params)
    assert by_text.sequences[0].tokens[: len(RANDOM_PROMPTS[0])] == llm.get_tokenizer().encode(text)
    with pytest.raises(RequestError, match=r"beam_width=11 .*\[1, 10\]") as info:
        llm.beam_search(RANDOM_PROMPTS[0], BeamSearchParams(beam_width=11, max_tokens=2))
    assert info.value.param == "beam_width"
    with pytest.raises(RequestError, match="maximum context length is 64") as info:
        llm.beam_search(RANDOM_PROMPTS[1], BeamSearchParams(beam_width=2, max_tokens=30))
    assert info.value.param == "max_tokens"
    assert not llm.llm_engine.has_unfinished_requests()
