"""LLMEngine.warm_up: runs the model once over the cache's first blocks and changes
nothing a request can see (the server calls it before announcing itself ready)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvrun.sampling_params import SamplingParams
from tests.support.engine import make_engine, run_all

PROMPTS = [list(range(100, 140)), [1, 504, 3458, 282, 4649, 314]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_warm_up_writes_the_first_blocks_and_changes_no_output_or_state(
    random_checkpoint: Callable[..., Path],
) -> None:
    model_dir = random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)
    cold = make_engine(model_dir, max_model_len=256, num_kv_blocks=64)
    warm = make_engine(model_dir, max_model_len=256, num_kv_blocks=64)
    block_size = warm.config.block_size
    stats_before, scheduler_before = warm.stats(), warm.scheduler.stats

    warm.warm_up(num_tokens=3 * block_size)

    assert warm.stats() == stats_before and warm.scheduler.stats == scheduler_before
    assert not warm.has_unfinished_requests()
    # it ran the model: the cache is written (it starts zeroed) ...
    assert any(bool(cache.any()) for cache in warm.runner.kv_caches)
    assert not any(bool(cache.any()) for cache in cold.runner.kv_caches)
    # ... and what it left there does not leak into requests given those blocks
    expected = [o.outputs[0].token_ids for o in run_all(cold, PROMPTS, GREEDY)]
    assert [o.outputs[0].token_ids for o in run_all(warm, PROMPTS, GREEDY)] == expected
