"""bfloat16 on cpu is batch and chunk invariant: a prompt's bits do not depend on how it
reached the model.

The same SmolLM2 prompt (a few hundred tokens, bf16) computed whole, in 16-token
prefill chunks, and behind a prefix-cache hit gives bit-identical prompt logprobs and
the same greedy continuation with bit-identical logprobs; alone or in a batch of other
requests (mixed prefill/decode steps, a different decode batch every step) the same.
This is what lets bf16 be cpu's ``dtype="auto"`` (seeded samples reproducible).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvrun.engine.llm_engine import LLMEngine
from kvrun.outputs import RequestOutput
from kvrun.sampling_params import SamplingParams
from tests.support.engine import make_engine, run_all

NEW_TOKENS = 24
TEXT = (
    "The history of computing is a story of layers. Early machines were programmed by "
    "rewiring panels; then came stored programs, assemblers, and compilers. Each layer "
    "hid the one below it and let more people build more things. Operating systems "
    "shared one machine among many users, networks joined machines into systems, and "
    "the web turned those systems into a place where billions of people work and talk. "
    "Today a language model answers questions by predicting one token after another, "
    "each prediction reading everything that came before it through attention. "
)


def _engine(model: Path, **kwargs: Any) -> LLMEngine:
    return make_engine(model, dtype="bfloat16", num_kv_blocks=256, max_model_len=1024, **kwargs)


@pytest.fixture(scope="module")
def prompts(smollm2_hf_dir: Path) -> list[list[int]]:
    """A long prompt (~300 tokens) first, then shorter ones for its batch mates."""
    from kvrun.loader import load_checkpoint, load_tokenizer

    tokenizer = load_tokenizer(
        load_checkpoint(str(smollm2_hf_dir), hf_hub_offline=True, use_modelscope=False)
    )
    long = tokenizer.encode(TEXT * 3)
    assert 250 <= len(long) <= 400, len(long)
    others = [
        tokenizer.encode("Write a short poem about the sea and the wind."),
        tokenizer.encode(TEXT[:200] + " In one sentence: what is attention?"),
        tokenizer.encode(TEXT * 2 + " Summarise the passage above."),
    ]
    return [long, *others]


@pytest.fixture(scope="module")
def whole(smollm2_hf_dir: Path) -> LLMEngine:
    """Every prompt in one chunk, nothing cached."""
    return _engine(smollm2_hf_dir, enable_prefix_caching=False)


def _logprobs(out: RequestOutput) -> tuple[list[int], list[dict[int, float]]]:
    seq = out.outputs[0]
    assert seq.logprobs is not None
    return list(seq.token_ids), [{t: lp.logprob for t, lp in d.items()} for d in seq.logprobs]


def _prompt_logprobs(out: RequestOutput) -> list[dict[int, float] | None]:
    assert out.prompt_logprobs is not None
    return [
        None if d is None else {t: lp.logprob for t, lp in d.items()} for d in out.prompt_logprobs
    ]


PROMPT_LP = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)


def test_prompt_logprobs_do_not_depend_on_the_chunks(
    smollm2_hf_dir: Path, prompts: list[list[int]], whole: LLMEngine
) -> None:
    chunked = _engine(
        smollm2_hf_dir, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=False
    )
    want = _prompt_logprobs(run_all(whole, prompts[:1], PROMPT_LP)[0])
    got = _prompt_logprobs(run_all(chunked, prompts[:1], PROMPT_LP)[0])
    assert len(want) == len(prompts[0])
    assert got == want
    # The continuation too: its first token comes from the last chunk.
    assert _logprobs(run_all(chunked, prompts[:1], GREEDY)[0]) == _logprobs(
        run_all(whole, prompts[:1], GREEDY)[0]
    )


def test_a_prefix_hit_changes_no_bit(
    smollm2_hf_dir: Path, prompts: list[list[int]], whole: LLMEngine
) -> None:
    cached = _engine(smollm2_hf_dir)
    long = prompts[0]
    sharing = long[:200] + prompts[1]  # shares 12 whole blocks with the long prompt
    want = [_logprobs(o) for o in run_all(whole, [long, sharing], GREEDY, one_at_a_time=True)]
    first = run_all(cached, [long], GREEDY)[0]
    behind_hit = run_all(cached, [sharing, long], GREEDY, one_at_a_time=True)
    assert first.num_cached_tokens == 0
    assert behind_hit[0].num_cached_tokens >= 192
    assert behind_hit[1].num_cached_tokens >= 256
    assert _logprobs(first) == want[0]
    assert [_logprobs(o) for o in behind_hit] == want[::-1]


def test_a_request_gets_the_same_bits_in_any_batch(
    smollm2_hf_dir: Path, prompts: list[list[int]], whole: LLMEngine
) -> None:
    alone = [_logprobs(o) for o in run_all(whole, prompts, GREEDY, one_at_a_time=True)]
    # All at once: prefills beside decodes, then decode batches that shrink as they end.
    params = [
        GREEDY,
        *(
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3)
            for n in (5, 11, NEW_TOKENS)
        ),
    ]
    batched = run_all(whole, prompts, params)
    assert _logprobs(batched[0]) == alone[0]
    for i in range(1, len(prompts)):
        tokens, logprobs = _logprobs(batched[i])
        n = len(tokens)
        assert (tokens, logprobs) == (alone[i][0][:n], alone[i][1][:n]), i
    # And in small chunks, so every step mixes chunks of several prompts with decodes.
    chunked = _engine(
        smollm2_hf_dir, max_num_batched_tokens=40, max_num_seqs=4, enable_prefix_caching=False
    )
    assert [_logprobs(o) for o in run_all(chunked, prompts, GREEDY)] == alone
