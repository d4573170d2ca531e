"""Batched LoRA in Triton: the ``add_lora`` op (its twin: kvrun.ops.reference.add_lora).

Two launches, as vLLM's punica kernels split the work: the shrink (one program per
token: ``buf[t] = A_s x[t]``, float32 sums rounded to the dtype, as the reference's
first F.linear rounds) and the expansion (one program per token and block of output
columns: ``out[t] = y[t] + scale_s * (B_s buf[t])``, the product rounded to the dtype,
then the scale, then the sum, each as the reference rounds). A token of slot -1 gets
``y`` exactly. Nothing is written to the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrun_cuda.triton.launch import SUM, kernel

__all__ = ["add_lora"]

_BLOCK_K = 128  # input columns per step of the shrink
_BLOCK_N = 128  # output columns per program of the expansion


@kernel
def _shrink_kernel(
    x_ptr,  # [T, K], row stride x_row
    a_ptr,  # [S, R, K] contiguous
    slot_ptr,  # [T] int64
    buf_ptr,  # [T, R] contiguous, the dtype
    k,
    r,
    x_row,
    BLOCK_R: tl.constexpr,  # next power of two >= R
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.full((BLOCK_R,), 0.0, tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t * x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
            a = tl.load(
                a_ptr + (slot * r + ranks[:, None]) * k + cols[None, :],
                mask=(ranks[:, None] < r) & (cols[None, :] < k),
                other=0.0,
            ).to(tl.float32)
            acc += tl.reduce(a * x[None, :], 1, SUM)
        tl.store(buf_ptr + t * r + ranks, acc.to(buf_ptr.dtype.element_ty), mask=ranks < r)


@kernel
def _expand_kernel(
    y_ptr,  # [T, N], row stride y_row
    buf_ptr,  # [T, R] contiguous
    b_ptr,  # [S, N, R] contiguous
    scale_ptr,  # [S] float32
    slot_ptr,  # [T] int64
    out_ptr,  # [T, N] contiguous
    n,
    r,
    y_row,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n
    y = tl.load(y_ptr + t * y_row + cols, mask=mask, other=0.0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        ranks = tl.arange(0, BLOCK_R)
        h = tl.load(buf_ptr + t * r + ranks, mask=ranks < r, other=0.0).to(tl.float32)
        b = tl.load(
            b_ptr + (slot * n + cols[:, None]) * r + ranks[None, :],
            mask=mask[:, None] & (ranks[None, :] < r),
            other=0.0,
        ).to(tl.float32)
        delta = tl.reduce(b * h[None, :], 1, SUM).to(y.dtype).to(tl.float32)
        delta = (delta * tl.load(scale_ptr + slot)).to(y.dtype).to(tl.float32)
        y = (y.to(tl.float32) + delta).to(y.dtype)
    tl.store(out_ptr + t * n + cols, y, mask=mask)


def add_lora(
    y: torch.Tensor,  # [T, N] the projection's output for x (bias included)
    x: torch.Tensor,  # [T, K] the projection's input
    lora_a: torch.Tensor,  # [S, R, K] every slot's A
    lora_b: torch.Tensor,  # [S, N, R] every slot's B
    scales: torch.Tensor,  # [S] float32: each slot's lora_alpha / r
    slots: torch.Tensor,  # [T] int64: each token's slot; -1 = no adapter
) -> torch.Tensor:  # [T, N]: y + scales[s] * (x @ A_s^T) @ B_s^T per token, s its slot
    tokens, n = y.shape
    r, k = lora_a.shape[1:]
    if y.stride(1) != 1:
        y = y.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    scales = scales.to(torch.float32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    out = torch.empty((tokens, n), dtype=y.dtype, device=y.device)
    if tokens == 0 or n == 0:
        return out
    buf = torch.empty((tokens, r), dtype=y.dtype, device=y.device)
    block_r = max(16, triton.next_power_of_2(r))
    _shrink_kernel[(tokens,)](
        x, lora_a, slots, buf, k, r, x.stride(0), BLOCK_R=block_r, BLOCK_K=_BLOCK_K, num_warps=4
    )
    block_n = min(_BLOCK_N, triton.next_power_of_2(n))
    _expand_kernel[(tokens, triton.cdiv(n, block_n))](
        y,
        buf,
        lora_b,
        scales,
        slots,
        out,
        n,
        r,
        y.stride(0),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out
