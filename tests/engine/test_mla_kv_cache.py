"""DeepSeek-V2's latent KV cache: one plane of kv_lora_rank + rope values per token and
layer, the value read as the key's first kv_lora_rank columns.

The allocator, the block manager and the start-up log count that plane's real bytes, so
a KV budget holds twice the tokens the two-plane form (key = value = the latent) did;
VLLM_MLA_DISABLE=1 keeps every head's key and value in two planes. The outputs stay
transformers' with prefix-cache hits and chunked prefills over the one plane.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_mla import MLA, _checkpoint
from tests.support.engine import hf_greedy, make_engine, run_all

BUDGET_GIB = 0.001  # VLLM_CPU_KVCACHE_SPACE: 1 MiB, a few hundred blocks of the tiny model
LAYERS, HEADS, FLOAT32 = 3, 4, 4  # _checkpoint's shape; make_engine's dtype float32


def _cache_bytes_per_token(engine: Any) -> list[int]:
    """Bytes each layer's cache tensor takes per token the block manager hands out."""
    tokens = engine.stats().scheduler.num_blocks * engine.config.block_size
    return [c.numel() * c.element_size() // tokens for c in engine.runner.kv_caches]


def test_the_latent_cache_is_one_plane_and_a_budget_holds_twice_the_tokens(
    random_checkpoint: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _checkpoint("v2-lite-shaped", random_checkpoint)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(BUDGET_GIB)}
    with caplog.at_level(logging.INFO, logger="kvrun"):
        engine = make_engine(model_dir, env=env, max_model_len=128)
    width = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
    assert _cache_bytes_per_token(engine) == [width * FLOAT32] * LAYERS

    budget, block_size = int(BUDGET_GIB * 2**30), engine.config.block_size
    one_plane = budget // (block_size * LAYERS * width * FLOAT32)
    two_planes = budget // (block_size * LAYERS * 2 * width * FLOAT32)
    blocks = engine.stats().scheduler.num_blocks
    assert blocks == one_plane and 2 * two_planes <= blocks <= 2 * two_planes + 1
    tokens = blocks * block_size
    assert (
        f"KV cache: {blocks} blocks of {block_size} tokens ({tokens} tokens, "
        f"{LAYERS * width * FLOAT32} bytes each)"
    ) in caplog.text
    assert f"the latent [c | k_pe] cached, {width} values per token and layer in one plane" in (
        caplog.text
    )

    # VLLM_MLA_DISABLE=1: every head's key and value, two planes, as before.
    heads = make_engine(model_dir, env={**env, "VLLM_MLA_DISABLE": "1"}, max_model_len=128)
    qk = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
    assert _cache_bytes_per_token(heads) == [2 * HEADS * qk * FLOAT32] * LAYERS


@pytest.mark.parametrize(
    "env",
    [{}, {"VLLM_MLA_PERFORM_MATRIX_ABSORPTION": "0"}],
    ids=["absorbed-at-load", "absorbed-per-step"],
)
def test_prefix_hits_and_chunks_over_the_latent_plane_match_transformers(
    env: dict[str, str], random_checkpoint: Callable[..., Path]
) -> None:
    """Prompts sharing two blocks' prefix, prefilled in chunks of 8: the later ones read
    the first one's latent rows from the cache (prefix hits) as keys and values."""
    model_dir = _checkpoint("v2-shaped-grouped", random_checkpoint)
    shared = list(range(200, 232))
    prompts = [[*shared, 7, 8, 9], [*shared, 11], [*shared, *range(40, 60)]]
    reference = hf_greedy(model_dir, prompts, 12)
    engine = make_engine(
        model_dir,
        env=env,
        max_model_len=128,
        max_num_batched_tokens=8,
        max_num_seqs=4,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
    )
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = run_all(engine, prompts, params, one_at_a_time=True)
    assert [o.outputs[0].token_ids for o in outputs] == reference.tokens
    assert engine.stats().scheduler.prefix_cache_hits > 0
    assert [c.shape[0] for c in engine.runner.kv_caches] == [1] * LAYERS  # one plane
