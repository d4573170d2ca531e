"""Triton kernels for the per-token ops, with wrappers of the reference ops' signatures.

Each wrapper has the signature, shapes, dtypes and rounding of its twin in
:mod:`kvrun.ops.reference`: math runs in fp32 and is rounded to the tensor dtype
wherever the reference rounds (for example, rms_norm rounds the normalised row to
x's dtype before the weight multiplies it). None writes to its inputs except
reshape_and_cache, whose job is to write the caches. Inputs may be strided views (the
model slices q and k out of one fused projection) as long as the last dimension is
contiguous; anything else is copied first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrun_cuda.fp8 import FP8_KV_DTYPE, FP8_KV_DTYPES, fp8_max
from kvrun_cuda.triton.launch import SUM, kernel

__all__ = [
    "FP8_KV_DTYPE",
    "FP8_KV_DTYPES",
    "FP8_MAX",
    "fused_add_rms_norm",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]


# The fp8 KV-cache formats the kernels read and write: FP8_KV_DTYPE (e4m3fn) is what
# kv_cache_dtype=fp8 means; the ROCm platform stores e4m3fnuz on MI300 (gfx94x). The
# saturation bound is the cache's own (fp8_max); FP8_MAX is e4m3fn's, for the AOT builds.
FP8_MAX = fp8_max(FP8_KV_DTYPE)  # 448.0


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride in its last dimension, which every kernel here assumes."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] (a view when the strides allow), unit last stride.

    The reference ops that work on the last dimension accept any leading shape (a
    per-head norm passes [T, H, D]); the kernels see rows.
    """
    return _rows(x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x)


@kernel
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] residual, read only when HAS_RESIDUAL
    w_ptr,  # [H]
    out_ptr,  # [T, H] normed
    sum_ptr,  # [T, H] x + residual, written only when HAS_RESIDUAL
    hidden,
    x_row,
    res_row,
    out_row,
    sum_row,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden: one program holds a whole row
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row + cols, mask=mask, other=0.0)
        # Rounded to the sum's dtype first: the reference normalises the rounded sum.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(xf * xf, 0, SUM) / hidden + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor | None,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (normed, x + residual or None), [rows, H]
    x = _matrix(x)
    weight = weight.contiguous()
    tokens, hidden = x.shape
    summed = None
    if residual is not None:
        residual = _matrix(residual)
        summed = torch.empty(
            (tokens, hidden),
            dtype=torch.promote_types(x.dtype, residual.dtype),
            device=x.device,
        )
    normed_dtype = x.dtype if summed is None else summed.dtype
    out = torch.empty(
        (tokens, hidden), dtype=torch.promote_types(normed_dtype, weight.dtype), device=x.device
    )
    if tokens == 0:
        return out, summed
    _rms_norm_kernel[(tokens,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        out if summed is None else summed,
        hidden,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        0 if summed is None else summed.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 4096 else 8,
    )
    return out, summed


def rms_norm(
    x: torch.Tensor,  # [T, H] (any leading shape)
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # x's shape, dtype promote(x, weight)
    return _launch_rms_norm(x, None, weight, eps)[0].view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H] (any leading shape)
    residual: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], x + residual [T, H])
    normed, summed = _launch_rms_norm(x, residual, weight, eps)
    assert summed is not None
    return normed.view(x.shape), summed.view(x.shape)


@kernel
def _rotary_kernel(
    pos_ptr,  # [T] int
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hk, D]
    cs_ptr,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
    qo_ptr,  # [T, Hq, D] contiguous
    ko_ptr,  # [T, Hk, D] contiguous
    q_tok,
    q_head,
    k_tok,
    k_head,
    cs_row,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    # One program per token: its cos/sin row is read once for all q and k heads.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    cos = tl.load(cs_ptr + pos * cs_row + d, mask=d_ok, other=0.0)
    sin = tl.load(cs_ptr + pos * cs_row + HALF + d, mask=d_ok, other=0.0)
    # The reference casts cos/sin to the rotated tensor's dtype before multiplying.
    qc = cos.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    qs = sin.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_HQ)[:, None]
    mask = (h < num_heads) & d_ok[None, :]
    src = q_ptr + t * q_tok + h * q_head + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = qo_ptr + t * num_heads * 2 * HALF + h * 2 * HALF + d[None, :]
    tl.store(dst, (x1 * qc - x2 * qs).to(qo_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * qc + x1 * qs).to(qo_ptr.dtype.element_ty), mask=mask)
    kc = cos.to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
    ks = sin.to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_HK)[:, None]
    mask = (h < num_kv_heads) & d_ok[None, :]
    src = k_ptr + t * k_tok + h * k_head + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = ko_ptr + t * num_kv_heads * 2 * HALF + h * 2 * HALF + d[None, :]
    tl.store(dst, (x1 * kc - x2 * ks).to(ko_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * kc + x1 * ks).to(ko_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hk, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
) -> tuple[torch.Tensor, torch.Tensor]:  # (query, key) rotated, new contiguous tensors
    """Rotate-half (GPT-NeoX / Hugging Face Llama) rotary embedding, out of place."""
    query, key, cos_sin_cache = _rows(query), _rows(key), _rows(cos_sin_cache)
    positions = positions.contiguous()
    tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        positions,
        query,
        key,
        cos_sin_cache,
        q_out,
        k_out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        num_kv_heads,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
    return q_out, k_out


@kernel
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I]: gate then up
    out_ptr,  # [T, I] contiguous
    inter,  # I
    x_row,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * x_row + inter + cols, mask=mask, other=0.0)
    # F.silu rounds to the input dtype before the reference multiplies by up.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, (act * up.to(tl.float32)).to(up.dtype), mask=mask)


_SILU_BLOCK = 1024  # columns per program: wide enough to stream, small enough to spread


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I] (any leading shape)
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    x = _matrix(x)
    tokens, width = x.shape
    inter = width // 2
    out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    if tokens == 0 or inter == 0:
        return out.view(shape)
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), BLOCK=block, num_warps=4
    )
    return out.view(shape)


@kernel
def _reshape_and_cache_kernel(
    k_ptr,  # [T, Hk, D]
    v_ptr,  # [T, Hk, D]
    kc_ptr,  # [num_blocks, block_size, Hk, D], any strides with a unit last stride
    vc_ptr,  # same shape and strides as kc
    slot_ptr,  # [T] int: block_id * block_size + offset; negative = padding, skipped
    k_tok,
    k_head,
    v_tok,
    v_head,
    c_block,
    c_slot,
    c_head,
    block_size,
    num_kv_heads,
    head_dim,
    k_scale,  # fp8 caches: stored = value / scale (1.0 otherwise)
    v_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,  # the caches are fp8 e4m3 (fn or fnuz): scale, saturate, then cast
    FP8_MAX: tl.constexpr,  # the cache format's largest finite value: a plain cast makes NaN
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # The slot test is broadcast to the tile by hand: the interpreter rejects a scalar mask.
    slots = tl.full((BLOCK_H, BLOCK_D), 0, tl.int64) + slot
    mask = (h < num_kv_heads) & (d < head_dim) & (slots >= 0)
    safe = tl.maximum(slot, 0)
    dst = (safe // block_size) * c_block + (safe % block_size) * c_slot + h * c_head + d
    key = tl.load(k_ptr + t * k_tok + h * k_head + d, mask=mask, other=0.0)
    value = tl.load(v_ptr + t * v_tok + h * v_head + d, mask=mask, other=0.0)
    if QUANT:
        key = tl.minimum(tl.maximum(key.to(tl.float32) / k_scale, -FP8_MAX), FP8_MAX)
        value = tl.minimum(tl.maximum(value.to(tl.float32) / v_scale, -FP8_MAX), FP8_MAX)
    tl.store(kc_ptr + dst, key.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, value.to(vc_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
    k_scale: float = 1.0,  # fp8 caches only: the layer's key scale
    v_scale: float = 1.0,  # fp8 caches only: the layer's value scale
) -> None:
    """Write each token's key and value into its cache slot, in place.

    A negative slot marks a padding token (a CUDA-graph batch padded to a captured
    size) and is skipped; the reference, indexing with it, would write the last slot.
    Into an fp8 cache (``float8_e4m3fn`` or ``float8_e4m3fnuz``) each value is stored as
    ``x / scale``, saturated to that format's range (+-448 or +-240); other caches take
    the scales as 1.
    """
    quant = key_cache.dtype in FP8_KV_DTYPES
    if not quant and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(
            f"k_scale={k_scale}, v_scale={v_scale} given for a {key_cache.dtype} cache; "
            "scales apply to fp8 caches only (float8_e4m3fn, float8_e4m3fnuz)"
        )
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    key, value = _rows(key), _rows(value)
    tokens, num_kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    c_block, c_slot, c_head, _ = key_cache.stride()
    _reshape_and_cache_kernel[(tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        c_block,
        c_slot,
        c_head,
        key_cache.shape[1],
        num_kv_heads,
        head_dim,
        k_scale,
        v_scale,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT=quant,
        FP8_MAX=fp8_max(key_cache.dtype) if quant else FP8_MAX,
        num_warps=4,
    )
