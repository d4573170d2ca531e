"""Mistral-style sliding windows (every layer sees the last W positions) against
transformers: a random Mistral with a 16-token window and 16-token blocks, prompts longer
than the window and generations several windows long, served to the model's full
max_position_embeddings; greedy tokens equal and logprobs within 1e-4 (float32), batched,
one at a time, with prefix-cache hits, in 16-token chunks under a cache smaller than one
full-length sequence. The scheduler meanwhile releases each request's blocks that fell
out of the window, so a request holds a bounded number of blocks however long it runs.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.sampling_params import SamplingParams
from tests.support.checkpoints import cached_build
from tests.support.engine import hf_greedy, make_engine, run_all
from tests.support.logs import kvrun_log

WINDOW = 16
BLOCK = 16
NEW_TOKENS = 64  # four windows
MAX_POSITIONS = 256
PROMPTS = [
    list(range(300, 340)),  # 40 tokens: longer than the window
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9, 4649, 314, 77, 81, 99],
    [5, 6, 7],
    [(17 * i) % 4000 + 10 for i in range(70)],  # 70 tokens: four blocks out of the window
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)


def _mistral(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint(
        "mistral",
        seed=7,
        init_std=0.3,
        num_layers=2,
        sliding_window=WINDOW,
        max_position_embeddings=MAX_POSITIONS,
    )


def test_transformers_windows_this_checkpoint(random_checkpoint: Callable[..., Path]) -> None:
    """The oracle really windows: the same weights with global attention continue the
    long prompts otherwise (so the parity below is a test of windows, not of causal
    attention that happens to agree)."""
    model_dir = _mistral(random_checkpoint)

    def without_window(out: Path) -> Path:
        shutil.copytree(model_dir, out, dirs_exist_ok=True)
        config = json.loads((out / "config.json").read_text())
        config["sliding_window"] = None
        (out / "config.json").write_text(json.dumps(config))
        return out

    global_dir = cached_build("mistral-global", {"from": str(model_dir)}, without_window)
    windowed = hf_greedy(model_dir, PROMPTS, NEW_TOKENS).tokens
    global_ = hf_greedy(global_dir, PROMPTS, NEW_TOKENS).tokens
    assert windowed[0] != global_[0] and windowed[3] != global_[3]
    # the short prompt's first tokens see the same positions either way
    assert windowed[2][: WINDOW - 3] == global_[2][: WINDOW - 3]


def test_mistral_window_matches_transformers(random_checkpoint: Callable[..., Path]) -> None:
    model_dir = _mistral(random_checkpoint)
    reference = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    with kvrun_log(logging.INFO) as messages:
        engine = make_engine(model_dir, block_size=BLOCK)
    # served to its full length, the window computed by the backend (not capped at it)
    assert engine.config.max_model_len == MAX_POSITIONS
    assert engine.scheduler.config.sliding_window == WINDOW
    # the fused decoder attends globally: passed over, with the reason
    assert engine.runner.fused_decoder is None  # type: ignore[attr-defined]
    assert any("decode steps run op by op" in m and "sliding_window" in m for m in messages)
    for one_at_a_time in (False, True):
        outputs = run_all(engine, PROMPTS, GREEDY, one_at_a_time=one_at_a_time)
        assert [o.outputs[0].token_ids for o in outputs] == reference.tokens, one_at_a_time
        for i, out in enumerate(outputs):
            seq = out.outputs[0]
            assert seq.logprobs is not None
            for step, token in enumerate(seq.token_ids):
                assert seq.logprobs[step][token].logprob == pytest.approx(
                    reference.chosen_logprobs[i][step], abs=1e-4
                ), (i, step, one_at_a_time)
    # the second pass hit the prefix cache (blocks released out of windows stay cached)
    assert engine.stats().scheduler.prefix_cache_hits > 0
    assert engine.scheduler.block_manager.num_used_blocks == 0


def test_window_in_chunks_under_a_cache_smaller_than_one_sequence(
    random_checkpoint: Callable[..., Path],
) -> None:
    """16-token chunks and 7 blocks, where one 256-token sequence fills 16: accepted only
    because a windowed request holds one step's span (3 blocks); four requests share it,
    preempting and recomputing, and still generate what transformers does. Each request
    holds at most that span at every step."""
    model_dir = _mistral(random_checkpoint)
    reference = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    engine = make_engine(
        model_dir, block_size=BLOCK, num_kv_blocks=7, max_num_batched_tokens=16, max_num_seqs=4
    )
    bm = engine.scheduler.block_manager
    ids = [engine.new_request_id() for _ in PROMPTS]
    for rid, prompt in zip(ids, PROMPTS):
        engine.add_request(rid, prompt, GREEDY)
    accumulator = OutputAccumulator()
    finished: dict[str, list[int]] = {}
    most_held = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        most_held = max([most_held, *(bm.num_held_blocks(rid) for rid in ids)])
    assert [finished[rid] for rid in ids] == reference.tokens
    assert engine.stats().scheduler.num_preemptions_total > 0
    # (W - 1 + 16) positions span at most 3 blocks; a full-length table would be 9 here
    assert most_held <= 3
    assert bm.num_free_blocks == bm.num_blocks


def test_cache_smaller_than_the_window_span_is_refused(
    random_checkpoint: Callable[..., Path],
) -> None:
    with pytest.raises(Exception, match=r"needs 3 \(a sliding window of 16"):
        make_engine(
            _mistral(random_checkpoint),
            block_size=BLOCK,
            num_kv_blocks=2,
            max_num_batched_tokens=16,
        )
