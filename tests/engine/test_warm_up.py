"""LLMEngine.warm_up: runs the model once over the cache's first blocks and changes
nothing a request can see (the server calls it before announcing itself ready)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import torch

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


def _resident_share(caches: list[torch.Tensor]) -> float:
    """The share of the caches' pages that are in memory (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for cache in caches:
        start = cache.data_ptr() // page * page
        end = -(-(cache.data_ptr() + cache.numel() * cache.element_size()) // page) * page
        vec = (ctypes.c_ubyte * ((end - start) // page))()
        assert libc.mincore(start, end - start, vec) == 0, os.strerror(ctypes.get_errno())
        resident += sum(b & 1 for b in vec)
        total += len(vec)
    return resident / total


def test_committing_the_cache_makes_it_resident_before_any_request(
    random_checkpoint: Callable[..., Path],
) -> None:
    """The cpu cache is calloc'd: untouched it costs no memory; a server commits it at
    start (warm_up(commit_kv_cache=True)) so its memory is its steady state at once."""
    model_dir = random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)
    resident = {}  # commit -> share of the cache in memory after warm_up
    for commit in (False, True):
        engine = make_engine(model_dir, max_model_len=256, env={"VLLM_CPU_KVCACHE_SPACE": "0.25"})
        caches = engine.runner.kv_caches  # type: ignore[attr-defined]
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        assert cache_bytes >= 0.24 * 2**30
        engine.warm_up(commit_kv_cache=commit)
        resident[commit] = _resident_share(caches)
        assert engine.runner.commit_kv_cache() == cache_bytes
        assert _resident_share(caches) == 1.0
    assert resident[False] < 0.2  # the warm-up writes only the first blocks
    assert resident[True] == 1.0
