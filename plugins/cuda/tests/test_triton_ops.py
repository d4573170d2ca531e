"""The Triton per-token kernels against the core's reference ops, on random inputs.

Every case runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, set per test:
kvrun_cuda's kernels choose compiled or interpreted at each launch, so the order in
which modules were imported does not matter), and again compiled on an NVIDIA GPU
when there is one. The interpreter runs fp32 and fp16 only: it gets bf16 wrong.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.ops import OP_NAMES
from kvrun.ops import reference as ref
from kvrun_cuda.triton import elementwise as tri
from kvrun_cuda.triton.launch import interpreting
from kvrun_cuda.triton.ops import TRITON_OP_NAMES, paged_attention, triton_ops

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dtypes_for(device: torch.device) -> tuple[torch.dtype, ...]:
    return GPU_DTYPES if device.type == "cuda" else INTERPRETER_DTYPES


def randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).mul_(2.0).to(dtype=dtype, device=device)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None) -> None:
    """Same shape and dtype, values within the dtype's tolerance."""
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol if atol is None else atol)


def test_op_table_covers_every_op_name_but_linear() -> None:
    # linear stays the reference (F.linear): cuBLAS is what a GPU should run for it.
    # The matmul ops stay the reference's (cuBLAS on a GPU).
    matmul = ("prepare_linear", "linear", "embedding")
    # apply_token_bitmask: the reference's torch runs on the device (its Triton kernel is
    # open work, NOTES.md); argmax: torch.argmax is already one device kernel
    missing = ("apply_token_bitmask", "argmax")
    assert TRITON_OP_NAMES == tuple(n for n in OP_NAMES if n not in matmul + missing)
    assert triton_ops()["rms_norm"] is tri.rms_norm
    assert triton_ops()["paged_attention"] is paged_attention


def test_the_launch_variant_follows_triton_interpret_at_launch_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Set after kvrun_cuda.triton was imported, and still obeyed.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (5, 96), (3, 576)])
def test_rms_norm(device: torch.device, tokens: int, hidden: int) -> None:
    for i, dtype in enumerate(dtypes_for(device)):
        x = randn(tokens, hidden, dtype=dtype, device=device, seed=i)
        w = randn(hidden, dtype=dtype, device=device, seed=10 + i)
        close(tri.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))


def test_rms_norm_of_a_strided_view_with_an_fp32_weight(device: torch.device) -> None:
    x = randn(4, 128, dtype=torch.float16, device=device, seed=1)[:, :64]  # row stride 128
    w = randn(64, dtype=torch.float32, device=device, seed=2)
    out = tri.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32  # promoted, as the reference's weight * normed
    close(out, ref.rms_norm(x, w, 1e-5))


def test_rms_norm_per_head_of_a_3d_input(device: torch.device) -> None:
    # A per-head q/k norm (Qwen3-style) normalises [T, H, D] over D; the reference does too.
    for i, dtype in enumerate(dtypes_for(device)):
        x = randn(3, 4, 64, dtype=dtype, device=device, seed=i)
        w = randn(64, dtype=dtype, device=device, seed=5 + i)
        out = tri.rms_norm(x, w, 1e-6)
        assert out.shape == (3, 4, 64)
        close(out, ref.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (6, 100)])
def test_fused_add_rms_norm(device: torch.device, tokens: int, hidden: int) -> None:
    for i, dtype in enumerate(dtypes_for(device)):
        x = randn(tokens, hidden, dtype=dtype, device=device, seed=i)
        residual = randn(tokens, hidden, dtype=dtype, device=device, seed=20 + i)
        w = randn(hidden, dtype=dtype, device=device, seed=40 + i)
        x_before, residual_before = x.clone(), residual.clone()
        normed, summed = tri.fused_add_rms_norm(x, residual, w, 1e-6)
        want_normed, want_summed = ref.fused_add_rms_norm(x, residual, w, 1e-6)
        # The sum is one rounding of the same two numbers: exact.
        assert torch.equal(summed, want_summed)
        close(normed, want_normed)
        assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (2, 2, 128), (3, 1, 64)]
)
def test_rotary_embedding_on_views_of_a_fused_qkv(
    device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    tokens, max_pos = 5, 40
    for i, dtype in enumerate(dtypes_for(device)):
        width = (num_heads + 2 * num_kv_heads) * head_dim
        qkv = randn(tokens, width, dtype=dtype, device=device, seed=i)
        q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim]
        k = k.view(tokens, num_kv_heads, head_dim)
        # The model's cache stays fp32 whatever the activations are.
        angles = randn(max_pos, head_dim // 2, dtype=torch.float32, device=device, seed=50 + i)
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
        positions = torch.tensor([0, 39, 7, 7, 21], device=device)
        qkv_before = qkv.clone()
        q_out, k_out = tri.rotary_embedding(positions, q, k, cos_sin)
        want_q, want_k = ref.rotary_embedding(positions, q, k, cos_sin)
        # The reference rounds both products to the dtype before subtracting them, the
        # kernel rounds once: where they cancel, the two differ by up to two roundings
        # of the largest input.
        atol = 2 * torch.finfo(dtype).eps * float(qkv.abs().max())
        close(q_out, want_q, atol=max(atol, TOLERANCE[dtype]))
        close(k_out, want_k, atol=max(atol, TOLERANCE[dtype]))
        assert torch.equal(qkv, qkv_before)  # out of place, like the reference


@pytest.mark.parametrize(("tokens", "inter"), [(1, 8), (4, 40), (2, 1100)])
def test_silu_and_mul(device: torch.device, tokens: int, inter: int) -> None:
    # 1100 columns take two programs of 1024: the second one's tail is masked.
    for i, dtype in enumerate(dtypes_for(device)):
        x = randn(tokens, 2 * inter, dtype=dtype, device=device, seed=i)
        close(tri.silu_and_mul(x), ref.silu_and_mul(x))


def test_silu_and_mul_keeps_leading_dimensions(device: torch.device) -> None:
    x = randn(2, 3, 16, dtype=torch.float32, device=device, seed=4)
    out = tri.silu_and_mul(x)
    assert out.shape == (2, 3, 8)
    close(out, ref.silu_and_mul(x))


@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(2, 64, 16), (1, 128, 16)])
def test_reshape_and_cache_writes_exactly_the_slots(
    device: torch.device, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    num_blocks = 6
    slots = torch.tensor([5, 17, 95, 48, 0], dtype=torch.int64, device=device)
    for i, dtype in enumerate(dtypes_for(device)):
        # fp32 activations into this dtype's cache: the kernel casts, as the reference does.
        key = randn(5, num_kv_heads, head_dim, dtype=torch.float32, device=device, seed=i)
        value = randn(5, num_kv_heads, head_dim, dtype=torch.float32, device=device, seed=9 + i)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = randn(*shape, dtype=dtype, device=device, seed=30 + i)
        v_cache = randn(*shape, dtype=dtype, device=device, seed=60 + i)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        tri.reshape_and_cache(key, value, k_cache, v_cache, slots)
        ref.reshape_and_cache(key, value, want_k, want_v, slots)
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_reshape_and_cache_skips_padding_slots(device: torch.device) -> None:
    dtype = torch.float16
    key = randn(4, 2, 64, dtype=dtype, device=device, seed=1)
    value = randn(4, 2, 64, dtype=dtype, device=device, seed=2)
    k_cache = randn(3, 16, 2, 64, dtype=dtype, device=device, seed=3)
    v_cache = randn(3, 16, 2, 64, dtype=dtype, device=device, seed=4)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    tri.reshape_and_cache(
        key, value, k_cache, v_cache, torch.tensor([3, -1, 40, -1], device=device)
    )
    keep = torch.tensor([0, 2], device=device)
    ref.reshape_and_cache(
        key[keep], value[keep], want_k, want_v, torch.tensor([3, 40], device=device)
    )
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_reshape_and_cache_quantises_into_an_fp8_cache(device: torch.device) -> None:
    fp8 = tri.FP8_KV_DTYPE
    slots = torch.tensor([5, 17, 40, 0], dtype=torch.int64, device=device)
    k_scale, v_scale = 0.0625, 0.25  # powers of two: x / scale is exact before the cast
    for i, dtype in enumerate(dtypes_for(device)):
        key = randn(4, 2, 64, dtype=dtype, device=device, seed=i)
        value = randn(4, 2, 64, dtype=dtype, device=device, seed=20 + i)
        if device.type == "cpu":
            # The interpreter rounds to fp8 wrongly (31.9 becomes 16, ties go away from
            # zero), so on CPU every value is one e4m3 can hold exactly once scaled: the
            # kernel's scaling, saturation and slots are tested, the GPU tests rounding.
            key = (key.float() / k_scale).to(fp8).float().mul(k_scale).to(dtype)
            value = (value.float() / v_scale).to(fp8).float().mul(v_scale).to(dtype)
        key[0, 0, :3] = torch.tensor([1e4, -1e4, 0.0])  # beyond e4m3's range once scaled
        k_cache = torch.zeros(3, 16, 2, 64, dtype=fp8, device=device)
        v_cache = torch.zeros(3, 16, 2, 64, dtype=fp8, device=device)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        tri.reshape_and_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
        # The fp8 oracle's quantisation: x / scale, saturated to +-448, then cast.
        ref.reshape_and_cache(
            (key.float() / k_scale).clamp(-448.0, 448.0).to(fp8),
            (value.float() / v_scale).clamp(-448.0, 448.0).to(fp8),
            want_k,
            want_v,
            slots,
        )
        assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
        assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))
        assert k_cache[0, 5, 0, :3].float().tolist() == [448.0, -448.0, 0.0]


def test_scales_for_a_cache_that_is_not_fp8_are_refused(device: torch.device) -> None:
    key = torch.zeros(1, 1, 16, device=device)
    cache = torch.zeros(1, 16, 1, 16, device=device)
    slots = torch.tensor([0], device=device)
    with pytest.raises(ValueError) as err:
        tri.reshape_and_cache(key, key, cache, cache.clone(), slots, 0.5, 1.0)
    assert str(err.value) == (
        "k_scale=0.5, v_scale=1.0 given for a torch.float32 cache; "
        "scales apply to fp8 caches only (float8_e4m3fn, float8_e4m3fnuz)"
    )


def test_empty_batches_launch_nothing(device: torch.device) -> None:
    x = torch.empty(0, 64, device=device)
    w = torch.ones(64, device=device)
    assert tri.rms_norm(x, w, 1e-6).shape == (0, 64)
    assert tri.silu_and_mul(torch.empty(0, 16, device=device)).shape == (0, 8)
