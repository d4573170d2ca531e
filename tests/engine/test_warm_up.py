"""LLMEngine.warm_up: runs the model once over the cache's first blocks and changes
nothing a request can see (the server calls it before announcing itself ready)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvrun.engine.model_runner import ModelRunner
from kvrun.sampling_params import SamplingParams
from tests.support.engine import make_engine, run_all

PROMPTS = [list(range(100, 140)), [1, 504, 3458, 282, 4649, 314]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@dataclass(frozen=True)
class Cold:
    """An engine never warmed up: whether its cache was all zeros before its first
    request, and its greedy tokens for PROMPTS (the outputs warm-up must not change)."""

    zeroed_at_start: bool
    tokens: list[list[int]]


@pytest.fixture(scope="module")
def model_dir(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)


@pytest.fixture(scope="module")
def cold(model_dir: Path) -> Cold:
    engine = make_engine(model_dir, max_model_len=256, num_kv_blocks=64)
    zeroed = not any(bool(cache.any()) for cache in engine.runner.kv_caches)  # type: ignore[attr-defined]
    tokens = [list(o.outputs[0].token_ids) for o in run_all(engine, PROMPTS, GREEDY)]
    return Cold(zeroed, tokens)


def test_warm_up_writes_the_first_blocks_and_changes_no_output_or_state(
    model_dir: Path, cold: Cold
) -> None:
    warm = make_engine(model_dir, max_model_len=256, num_kv_blocks=64)
    block_size = warm.config.block_size
    stats_before, scheduler_before = warm.stats(), warm.scheduler.stats

    warm.warm_up(num_tokens=3 * block_size)

    assert warm.stats() == stats_before and warm.scheduler.stats == scheduler_before
    assert not warm.has_unfinished_requests()
    # it ran the model: the cache is written (it starts zeroed) ...
    assert any(bool(cache.any()) for cache in warm.runner.kv_caches)  # type: ignore[attr-defined]
    assert cold.zeroed_at_start
    # ... and what it left there does not leak into requests given those blocks
    assert [list(o.outputs[0].token_ids) for o in run_all(warm, PROMPTS, GREEDY)] == cold.tokens


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


def test_commit_kv_cache_makes_a_lazily_mapped_cache_resident() -> None:
    """A cache in fresh anonymous memory (as the cpu plugin's calloc'd pool is until
    written) has no page in memory; commit_kv_cache writes them all once."""
    nbytes = 64 << 20
    mapping = mmap.mmap(-1, nbytes)  # fresh zero pages, none resident yet
    cache = torch.frombuffer(mapping, dtype=torch.float32).view(2, -1, 16)
    assert _resident_share([cache]) < 0.01
    runner = ModelRunner(None, [cache], 16, torch.device("cpu"))  # type: ignore[arg-type]
    assert runner.commit_kv_cache() == nbytes
    assert _resident_share([cache]) == 1.0
    assert not cache.any()  # zeros written over zeros: nothing a request could see
    del cache, runner
    mapping.close()


def test_the_servers_warm_up_commits_the_whole_cache(model_dir: Path, cold: Cold) -> None:
    """warm_up(commit_kv_cache=True), as the server runs it: every page of every layer's
    cache is in memory before the first request, and outputs are unchanged."""
    engine = make_engine(model_dir, max_model_len=256, env={"VLLM_CPU_KVCACHE_SPACE": "0.25"})
    caches = engine.runner.kv_caches  # type: ignore[attr-defined]
    assert sum(c.numel() * c.element_size() for c in caches) >= 0.24 * 2**30
    engine.warm_up(commit_kv_cache=True)
    assert _resident_share(caches) == 1.0
    assert [list(o.outputs[0].token_ids) for o in run_all(engine, PROMPTS, GREEDY)] == cold.tokens
