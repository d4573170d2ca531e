"""Each CPU op against the core's reference op on random inputs, as cpu_ops() hands it
out without native kernels (the torch paths) and bound to them."""

from __future__ import annotations

import functools

import pytest
import torch

from kvrun.ops import OP_NAMES, OpTable, reference, reference_ops
from kvrun_cpu import ops
from kvrun_cpu.native import NativeKernels, PackedWeight

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.fixture(params=["torch", "native"])
def cpu(request: pytest.FixtureRequest) -> OpTable:
    """The ops as cpu_ops() hands them out: without, and bound to, the native kernels."""
    native = None if request.param == "torch" else request.getfixturevalue("native_kernels")
    return reference_ops().with_overrides(ops.cpu_ops(native), f"kvrun-cpu ({request.param})")


def test_cpu_ops_override_every_forward_op_by_its_known_name() -> None:
    overrides = ops.cpu_ops()
    # awq_dequantize runs once per AWQ layer at load: the reference's torch is enough;
    # prepare_experts: the cpu fused_moe takes the experts as the reference's list.
    reference_only = {"awq_dequantize", "prepare_experts"}
    assert sorted(overrides) == sorted(n for n in OP_NAMES if n not in reference_only)
    table = reference_ops().with_overrides(overrides, "kvrun-cpu")
    assert table.rms_norm is ops.rms_norm and table.paged_attention is ops.paged_attention


def test_native_kernels_are_bound_to_every_op(native_kernels: NativeKernels) -> None:
    for name, bound in ops.cpu_ops(native_kernels).items():
        assert isinstance(bound, functools.partial), name
        assert bound.func is getattr(ops, name) and bound.keywords == {"native": native_kernels}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("tokens", "inner", "outer"), [(1, 576, 960), (7, 33, 40), (64, 576, 1536)]
)
def test_linear_through_prepare_linear(
    cpu: OpTable, tokens: int, inner: int, outer: int, bias: bool
) -> None:
    x, w = randn(tokens, inner), randn(outer, inner, seed=1)
    b = randn(outer, seed=2) if bias else None
    prepared = cpu.prepare_linear(w)
    torch.testing.assert_close(
        cpu.linear(x, prepared, b), reference.linear(x, w, b), atol=1e-4, rtol=1e-4
    )
    assert torch.equal(
        cpu.embedding(torch.tensor([0, outer - 1, 3]), prepared), w[[0, outer - 1, 3]]
    )


def test_prepare_linear_packs_what_the_native_matmuls_take(native_kernels: NativeKernels) -> None:
    table = reference_ops().with_overrides(ops.cpu_ops(native_kernels), "kvrun-cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert isinstance(table.prepare_linear(randn(40, 16, dtype=dtype)), PackedWeight)
    fp16 = randn(40, 16, dtype=torch.float16)
    assert table.prepare_linear(fp16) is fp16  # no native fp16 matmul: F.linear takes it
    plain = randn(40, 16)
    assert ops.prepare_linear(plain) is plain  # no native kernels: as it is


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (7, 33), (64, 576)])
def test_rms_norm(cpu: OpTable, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x, w = randn(tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype, seed=1)
    before = x.clone()
    close(cpu.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype)
    assert torch.equal(x, before)


def test_rms_norm_mixed_dtypes_keeps_the_reference_result_dtype(cpu: OpTable) -> None:
    x, w = randn(3, 16, dtype=torch.bfloat16), randn(16, seed=1)
    close(cpu.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (7, 33), (64, 576)])
def test_fused_add_rms_norm(cpu: OpTable, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x, r = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=2)
    w = randn(hidden, dtype=dtype, seed=1)
    x0, r0 = x.clone(), r.clone()
    normed, summed = cpu.fused_add_rms_norm(x, r, w, 1e-5)
    want_normed, want_summed = reference.fused_add_rms_norm(x, r, w, 1e-5)
    close(normed, want_normed, dtype)
    close(summed, want_summed, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


def cos_sin_cache(max_pos: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "dim"), [(1, 9, 3, 64), (5, 4, 4, 32), (33, 8, 2, 64)]
)
def test_rotary_embedding(
    cpu: OpTable, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int, dim: int
) -> None:
    q, k = randn(tokens, heads, dim, dtype=dtype), randn(tokens, kv_heads, dim, dtype=dtype, seed=1)
    positions = torch.randint(0, 300, (tokens,), generator=torch.Generator().manual_seed(3))
    cache = cos_sin_cache(300, dim)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = cpu.rotary_embedding(positions, q, k, cache)
    want_q, want_k = reference.rotary_embedding(positions, q, k, cache)
    close(got_q, want_q, dtype)
    close(got_k, want_k, dtype)
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("tokens", [1, 6])
def test_rotary_embedding_on_views_of_a_fused_projection(cpu: OpTable, tokens: int) -> None:
    # The model slices q and k from one qkv projection: the kernel rotates them as one.
    qkv = randn(tokens, (9 + 3 + 3) * 64)
    q = qkv[:, : 9 * 64].view(tokens, 9, 64)
    k = qkv[:, 9 * 64 : 12 * 64].view(tokens, 3, 64)
    assert ops._joint_view(q, k) is not None
    positions = torch.tensor([0, 1, 2, 40, 41, 511][:tokens])
    cache = cos_sin_cache(512, 64)
    qkv0 = qkv.clone()
    got_q, got_k = cpu.rotary_embedding(positions, q, k, cache)
    want_q, want_k = reference.rotary_embedding(positions, q, k, cache)
    close(got_q, want_q, torch.float32)
    close(got_k, want_k, torch.float32)
    assert torch.equal(qkv, qkv0)


def test_rotary_joint_view_only_for_adjacent_q_and_k() -> None:
    qkv = randn(4, 15 * 64)
    q = qkv[:, : 9 * 64].view(4, 9, 64)
    v = qkv[:, 12 * 64 :].view(4, 3, 64)  # not right after q
    assert ops._joint_view(q, v) is None
    assert ops._joint_view(q, randn(4, 3, 64)) is None  # another tensor
    assert ops._joint_view(q, qkv[:, 9 * 64 : 12 * 64].view(4, 3, 64).to(torch.bfloat16)) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (7, 17), (64, 1536)])
def test_silu_and_mul(cpu: OpTable, dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = randn(tokens, 2 * inter, dtype=dtype)
    x0 = x.clone()
    close(cpu.silu_and_mul(x), reference.silu_and_mul(x), dtype)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_reshape_and_cache_writes_exactly_the_reference_slots(
    cpu: OpTable, dtype: torch.dtype, tokens: int
) -> None:
    num_blocks, block_size, kv_heads, dim = 12, 16, 3, 8
    k, v = randn(tokens, kv_heads, dim), randn(tokens, kv_heads, dim, seed=1)
    gen = torch.Generator().manual_seed(4)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    caches = [randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, seed=s) for s in (5, 6)]
    want = [c.clone() for c in caches]
    cpu.reshape_and_cache(k, v, caches[0], caches[1], slots)
    reference.reshape_and_cache(k, v, want[0], want[1], slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 2)])
def test_paged_attention(cpu: OpTable, dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    num_blocks, block_size, dim = 80, 16, 32
    # decode, prefill from scratch, decode, chunk after a prefix hit, decode, tiny prefill
    seq_lens = [50, 30, 7, 33, 200, 2]
    query_lens = [1, 30, 1, 17, 1, 2]
    gen = torch.Generator().manual_seed(7)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    rows = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    width = max(len(r) for r in rows)
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    key_cache = randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, seed=8)
    value_cache = randn(num_blocks, block_size, kv_heads, dim, dtype=dtype, seed=9)
    query = randn(sum(query_lens), heads, dim, dtype=dtype, seed=10)
    args = (query, key_cache, value_cache, tables, seq_lens, query_lens, dim**-0.5)
    close(cpu.paged_attention(*args), reference.paged_attention(*args), dtype)


@pytest.mark.parametrize(("batch", "vocab"), [(1, 49152), (5, 100), (64, 4099)])
def test_native_token_bitmask_equals_the_reference(
    native_kernels: NativeKernels, batch: int, vocab: int
) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(batch, vocab, generator=g)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31, (batch, words), generator=g).to(torch.int32)
    bitmask[:, ::3] = -1  # whole words allowed: the kernel's skip
    bitmask[:, 1::5] = 0  # whole words refused
    rows = torch.randperm(batch, generator=g)[: max(1, batch // 2)]
    want = logits.clone()
    reference.apply_token_bitmask(want, bitmask[: len(rows)], rows)
    got = logits.clone()
    ops.apply_token_bitmask(got, bitmask[: len(rows)], rows, native=native_kernels)
    assert torch.equal(got, want)
    with pytest.raises(IndexError, match="outside"):
        native_kernels.apply_token_bitmask(got, bitmask[:1], torch.tensor([batch]))


@pytest.mark.parametrize(("batch", "vocab"), [(1, 1), (3, 15), (4, 16), (9, 17), (64, 49152)])
def test_native_argmax_picks_what_torch_argmax_picks(
    native_kernels: NativeKernels, batch: int, vocab: int
) -> None:
    g = torch.Generator().manual_seed(batch * vocab)
    # few distinct values: many ties, inside a vector lane, across lanes and in the tail
    logits = torch.randint(-3, 4, (batch, vocab), generator=g).float()
    assert torch.equal(ops.argmax(logits, native=native_kernels), logits.argmax(dim=1))
    logits = torch.randn(batch, vocab, generator=g)
    assert torch.equal(ops.argmax(logits, native=native_kernels), logits.argmax(dim=1))
    if vocab >= 16:
        logits[0] = float("-inf")  # nothing larger than the first
        logits[-1, vocab - 1] = float("nan")  # a NaN in the tail wins
        if batch > 2:
            logits[1, [5, vocab // 2]] = float("nan")  # the first NaN wins
            logits[2] = 0.0
            logits[2, : vocab // 2] = -0.0  # -0.0 equals 0.0: the first index
    assert torch.equal(ops.argmax(logits, native=native_kernels), logits.argmax(dim=1))
    wide = torch.randn(batch, vocab + 40, generator=g)[:, 3 : vocab + 3]  # rows with a stride
    assert torch.equal(ops.argmax(wide, native=native_kernels), wide.argmax(dim=1))
