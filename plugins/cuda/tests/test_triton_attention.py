"""TRITON_ATTN and the Triton paged_attention op against the core's reference.

Each case fills a cache with random garbage, so the cached part of every context
(a prefix hit, an earlier prefill chunk, the history of a decode) is whatever sits in
the blocks the table names; block ids are shuffled and non-contiguous, so reading a
wrong block, a padded tail or another request's tokens disagrees with the oracle.
Runs in Triton's interpreter on CPU (fp32, fp16) and compiled on an NVIDIA GPU when
there is one (bf16 too, and one larger case).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.ops import reference as ref
from kvrun_cuda.triton.attention import TritonAttention
from kvrun_cuda.triton.elementwise import FP8_KV_DTYPE
from kvrun_cuda.triton.ops import paged_attention
from kvrun_cuda.triton.paged_attention import MAX_SPLITS, decode_splits, unified_attention

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (cached tokens, new tokens) per request
BATCHES = {
    "decode": [(3, 1), (20, 1), (32, 1)],
    "prefill": [(0, 5), (0, 19)],
    "mixed": [(0, 5), (3, 1), (20, 1)],
    "prefix-hit": [(16, 3), (17, 6), (0, 2)],
}
HEADS = [(4, 4, 64), (4, 2, 128), (3, 1, 64)]  # (query heads, kv heads, head dim)


def make_meta(
    requests: list[tuple[int, int]],  # (cached tokens, new tokens) per request
    block_size: int,
    num_blocks: int,
    device: torch.device,
    seed: int,
) -> AttentionMetadata:
    """A batch whose requests own shuffled, disjoint blocks; tables padded with 0."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, slots, starts = [], [], [0]
    for cached, new in requests:
        n_blocks = -(-(cached + new) // block_size)
        table, order = order[:n_blocks], order[n_blocks:]
        assert len(table) == n_blocks, "the test's cache is too small"
        tables.append(table)
        for pos in range(cached, cached + new):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + new)
    width = max(len(t) for t in tables)
    query_lens = [new for _, new in requests]
    seq_lens = [cached + new for cached, new in requests]
    return AttentionMetadata(
        num_tokens=starts[-1],
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
        ),
        query_lens=query_lens,
        seq_lens_host=seq_lens,
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def run_case(
    device: torch.device,
    requests: list[tuple[int, int]],
    heads: tuple[int, int, int],
    dtype: torch.dtype,
    block_size: int = 16,
    num_blocks: int = 12,
    seed: int = 0,
) -> None:
    num_heads, num_kv_heads, head_dim = heads
    spec = AttentionLayerSpec(num_heads, num_kv_heads, head_dim, head_dim**-0.5)
    meta = make_meta(requests, block_size, num_blocks, device, seed)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(2.0).to(dtype=dtype, device=device)

    shape = TritonAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = randn(*shape)
    want_cache = cache.clone()
    tokens = meta.num_tokens
    query = randn(tokens, num_heads, head_dim)
    key, value = randn(tokens, num_kv_heads, head_dim), randn(tokens, num_kv_heads, head_dim)
    out = TritonAttention(spec).forward(query, key, value, cache, meta)
    want = ReferenceAttention(spec).forward(query, key, value, want_cache, meta)
    assert torch.equal(cache, want_cache)  # the same slots written with the same values
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_cache_layout_is_the_reference_layout() -> None:
    assert TritonAttention.name == "TRITON_ATTN"
    assert TritonAttention.kv_cache_shape(100, 16, 8, 128) == (2, 100, 16, 8, 128)
    assert TritonAttention.kv_cache_shape(7, 32, 2, 64) == ReferenceAttention.kv_cache_shape(
        7, 32, 2, 64
    )


def test_unsupported_reasons() -> None:
    assert TritonAttention.unsupported_reason(128, torch.float16) is None
    assert TritonAttention.unsupported_reason(80, torch.bfloat16) is None
    assert TritonAttention.unsupported_reason(128, torch.float64) == (
        "TRITON_ATTN does not support dtype float64; supported: float16, bfloat16, float32"
    )
    assert TritonAttention.unsupported_reason(512, torch.float16) == (
        "TRITON_ATTN supports head sizes 1..256, not 512"
    )


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("heads", HEADS, ids=["mha-64", "gqa2-128", "gqa3-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backend_matches_the_reference(
    device: torch.device, batch: str, heads: tuple[int, int, int], dtype: torch.dtype
) -> None:
    run_case(device, BATCHES[batch], heads, dtype)


def test_backend_with_a_block_size_and_head_size_that_are_not_powers_of_two(
    device: torch.device,
) -> None:
    # The kernel finds each token's slot through the table: blocks of 24 straddle tiles.
    # Head size 80 pads to 128 lanes in the kernel, masked.
    run_case(device, [(30, 1), (10, 8), (0, 3)], (4, 2, 80), torch.float32, block_size=24)


def test_paged_attention_op_matches_the_reference_op(device: torch.device) -> None:
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    meta = make_meta(BATCHES["mixed"], block_size, 8, device, seed=3)
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float16):
        k_cache, v_cache = (
            torch.randn(8, block_size, num_kv_heads, head_dim, generator=gen)
            .to(dtype=dtype, device=device)
            .mul_(2.0)
            for _ in range(2)
        )
        query = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen).to(dtype=dtype)
        query = query.to(device)
        # int64 tables too: the op takes any integer table, as the reference does.
        tables = meta.block_tables if dtype == torch.float32 else meta.block_tables.long()
        args = (query, k_cache, v_cache, tables, meta.seq_lens_host, meta.query_lens)
        out = paged_attention(*args, 0.3)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out, ref.paged_attention(*args, 0.3), rtol=tol, atol=tol)


def test_decode_splits_depend_on_the_batch_shape_only() -> None:
    assert MAX_SPLITS == 16
    assert [decode_splits(b, h) for b, h in [(1, 8), (3, 2), (8, 8), (1, 32), (16, 8)]] == [
        16,
        16,
        4,
        8,
        1,
    ]


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_split_over_programs(device: torch.device, num_splits: int) -> None:
    # 3 splits of 100 tokens: 64 + 36 (tiles of 32); of 5 tokens: 5 + two empty splits.
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    meta = make_meta([(99, 1), (69, 1), (4, 1)], block_size, 16, device, seed=7)
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float16):
        k_cache, v_cache = (
            torch.randn(16, block_size, num_kv_heads, head_dim, generator=gen)
            .to(dtype=dtype, device=device)
            .mul_(2.0)
            for _ in range(2)
        )
        query = torch.randn(3, num_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
        out = unified_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            1,
            0.125,
            num_splits=num_splits,
        )
        want = ref.paged_attention(
            query, k_cache, v_cache, meta.block_tables, meta.seq_lens_host, meta.query_lens, 0.125
        )
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch", ["mixed", "decode"])
def test_attention_over_an_fp8_cache_matches_the_dequantised_reference(
    device: torch.device, batch: str
) -> None:
    # Decode batches take the split path, mixed ones the single-pass one.
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 16
    meta = make_meta(BATCHES[batch], block_size, 8, device, seed=11)
    gen = torch.Generator().manual_seed(11)
    k_scale, v_scale = 0.02, 0.05
    k_cache, v_cache = (
        (torch.randn(8, block_size, num_kv_heads, head_dim, generator=gen) * 100)
        .clamp(-448.0, 448.0)
        .to(device=device, dtype=FP8_KV_DTYPE)
        for _ in range(2)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    query = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    query = query.to(device)
    out = unified_attention(
        query,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        0.125,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    # The fp8 oracle's reading: stored * scale in fp32, rounded to the query's dtype.
    keys = (k_cache.float() * k_scale).to(dtype)
    values = (v_cache.float() * v_scale).to(dtype)
    want = ref.paged_attention(
        query, keys, values, meta.block_tables, meta.seq_lens_host, meta.query_lens, 0.125
    )
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_backend_in_bf16_on_the_gpu(batch: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    run_case(torch.device("cuda"), BATCHES[batch], (8, 2, 128), torch.bfloat16)


@pytest.mark.gpu
def test_backend_on_a_llama_sized_batch_on_the_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    requests = [(700, 1), (0, 300), (513, 90), (64, 1), (1000, 1)]
    run_case(torch.device("cuda"), requests, (32, 8, 128), torch.float16, num_blocks=250, seed=5)
