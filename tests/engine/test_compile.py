"""enforce_eager=False: the compiled dense block generates what eager does, cached under
VLLM_CACHE_ROOT, and VLLM_DISABLE_COMPILE_CACHE=1 stops the reuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from kvrun.sampling_params import SamplingParams
from tests.support.engine import hf_greedy, make_engine, run_all

NEW_TOKENS = 12
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 140)), [5, 6, 7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2, num_kv_heads=2)


def _compiled_tokens(model_dir: Path, env: dict[str, str]) -> list[list[int]]:
    torch._dynamo.reset()  # a fresh process's view: nothing compiled in memory
    counters.clear()
    engine = make_engine(model_dir, env=env, max_model_len=128, enforce_eager=False)
    return [o.outputs[0].token_ids for o in run_all(engine, PROMPTS, GREEDY)]


def test_compiled_matches_transformers_and_reuses_its_cache(
    model_dir: Path, tmp_path: Path
) -> None:
    expected = hf_greedy(model_dir, PROMPTS, NEW_TOKENS).tokens
    env = {"VLLM_CACHE_ROOT": str(tmp_path)}

    assert _compiled_tokens(model_dir, env) == expected
    assert counters["inductor"]["fxgraph_cache_miss"] > 0
    assert counters["inductor"]["fxgraph_cache_hit"] == 0
    cache_dir = tmp_path / "torch_compile_cache"
    assert any(cache_dir.rglob("*")), "nothing was cached under VLLM_CACHE_ROOT"

    # A second start compiles from the cache.
    assert _compiled_tokens(model_dir, env) == expected
    assert counters["inductor"]["fxgraph_cache_hit"] > 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 0

    # With the cache disabled the same start neither reads nor records graphs.
    assert _compiled_tokens(model_dir, {**env, "VLLM_DISABLE_COMPILE_CACHE": "1"}) == expected
    assert counters["inductor"]["fxgraph_cache_hit"] == 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
