"""XLA_PAGED attention on PJRT's CPU device against the core's reference op and against
torch_xla's own ragged paged attention (non-kernel path), which reads the cache layout the
Pallas kernel reads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.ops import reference
from kvrun.scheduling.output import ScheduledChunk
from kvrun_tpu.attention import XlaPagedAttention
from kvrun_tpu.buckets import BucketSpec
from kvrun_tpu.runner import pad_batch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None,
    reason="torch_xla is not installed; run `nox -s tpu`",
)

BS, HQ, HK, D, NUM_BLOCKS = 4, 4, 2, 8, 10
BUCKETS = BucketSpec(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=16, block_size=BS)
# A prefill after a 5-token prefix hit, a fresh 3-token prompt and a decode at position 9.
CHUNKS = [
    ScheduledChunk("hit", [1] * 4, 5, [7, 2, 5], samples=True, is_prefill=True),
    ScheduledChunk("new", [1] * 3, 0, [0], samples=True, is_prefill=True),
    ScheduledChunk("decode", [1], 9, [3, 8, 1], samples=True, is_prefill=False),
]


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(NUM_BLOCKS + 1, BS, 2 * HK, D, generator=g)
    tp = pad_batch(CHUNKS, BUCKETS, NUM_BLOCKS).meta.slot_mapping.shape[0]
    return {
        "cache": cache,
        "query": torch.randn(tp, HQ, D, generator=g),
        "key": torch.randn(tp, HK, D, generator=g),
        "value": torch.randn(tp, HK, D, generator=g),
    }


def _xla_forward(case: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch_xla

    from kvrun_tpu.runner import meta_to_device

    device = torch_xla.device()
    meta = meta_to_device(pad_batch(CHUNKS, BUCKETS, NUM_BLOCKS).meta, device)
    spec = AttentionLayerSpec(num_heads=HQ, num_kv_heads=HK, head_dim=D, scale=D**-0.5)
    cache = case["cache"].to(device)
    out = XlaPagedAttention(spec).forward(
        case["query"].to(device), case["key"].to(device), case["value"].to(device), cache, meta
    )
    torch_xla.sync()
    return out.cpu(), cache.cpu()


def test_matches_the_reference_op_and_leaves_padding_in_the_sink(
    case: dict[str, torch.Tensor],
) -> None:
    out, cache = _xla_forward(case)
    # The reference layout: separate key and value caches of [blocks, bs, Hk, D].
    key_cache = case["cache"][:NUM_BLOCKS, :, 0::2].clone()
    value_cache = case["cache"][:NUM_BLOCKS, :, 1::2].clone()
    meta = pad_batch(CHUNKS, BUCKETS, NUM_BLOCKS).meta
    t = meta.num_tokens
    reference.reshape_and_cache(
        case["key"][:t], case["value"][:t], key_cache, value_cache, meta.slot_mapping[:t]
    )
    expected = reference.paged_attention(
        case["query"][:t],
        key_cache,
        value_cache,
        meta.block_tables[:3],
        meta.seq_lens_host,
        meta.query_lens,
        D**-0.5,
    )
    torch.testing.assert_close(out[:t], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[:NUM_BLOCKS, :, 0::2], key_cache)
    torch.testing.assert_close(cache[:NUM_BLOCKS, :, 1::2], value_cache)
    # 8 real tokens in a 16-token bucket: the 8 padding tokens wrote only to the sink.
    assert (t, meta.slot_mapping.tolist()[t:]) == (8, [40, 41, 42, 43, 40, 41, 42, 43])


def test_cache_layout_is_the_pallas_kernels(case: dict[str, torch.Tensor]) -> None:
    import torch_xla
    from torch_xla.experimental.custom_kernel import _ragged_paged_attention_nonkernel

    out, cache = _xla_forward(case)
    meta = pad_batch(CHUNKS, BUCKETS, NUM_BLOCKS).meta
    device = torch_xla.device()
    # torch_xla's reference for ragged_paged_attention: the kernel's inputs, no kernel.
    theirs = _ragged_paged_attention_nonkernel(
        case["query"].to(device),
        cache.to(device),
        meta.seq_lens.to(device),
        meta.block_tables.to(device),
        meta.query_start_loc.to(device),
        meta.num_seqs_device.to(device),
        None,
        None,
        sm_scale=D**-0.5,
    )
    torch.testing.assert_close(out[: meta.num_tokens], theirs.cpu(), rtol=1e-5, atol=1e-5)
