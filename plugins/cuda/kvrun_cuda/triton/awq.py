"""AWQ dequantisation in Triton: the ``awq_dequantize`` op (VLLM_USE_TRITON_AWQ=1).

An AWQ layer arrives as int32 words of eight 4-bit values (``qweight [K, N / 8]``,
``qzeros [G, N / 8]``) and per-group ``scales [G, N]``; column ``8 j + c`` of a word
row sits in nibble ``c // 2 + 4 (c % 2)`` (AutoAWQ's interleave, the inverse of
:data:`kvrun.ops.reference.AWQ_ORDER`). One program makes a tile of the weight: it
reads each word once per column it holds, shifts the column's nibble out, subtracts
the group's zero point, multiplies by its scale in float32 and stores the tile
transposed, as ``[N, K]``, the layout ``linear`` reads. The loader runs it once per
layer at load; the model then runs on the dequantised weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrun_cuda.triton.launch import kernel

__all__ = ["awq_dequantize"]

# Tile of the stored layout [K, N] one program makes: 64 input rows x 64 output columns.
BLOCK_K = 64
BLOCK_N = 64


@kernel
def _awq_dequantize_kernel(
    qweight_ptr,  # [K, N / 8] int32
    qzeros_ptr,  # [G, N / 8] int32
    scales_ptr,  # [G, N]
    out_ptr,  # [N, K] float32
    rows,  # K
    cols,  # N
    group_size,  # input rows per group
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # input rows
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    mask = (k[:, None] < rows) & (n[None, :] < cols)
    words = cols // 8
    word = n // 8
    within = n % 8
    shift = (within // 2 + 4 * (within % 2)) * 4  # the column's nibble, as bits
    q = tl.load(qweight_ptr + k[:, None].to(tl.int64) * words + word[None, :], mask=mask, other=0)
    group = k // group_size
    z = tl.load(
        qzeros_ptr + group[:, None].to(tl.int64) * words + word[None, :], mask=mask, other=0
    )
    s = tl.load(scales_ptr + group[:, None].to(tl.int64) * cols + n[None, :], mask=mask, other=0.0)
    q = (q >> shift[None, :]) & 0xF  # the arithmetic shift's sign bits are masked off
    z = (z >> shift[None, :]) & 0xF
    w = (q - z).to(tl.float32) * s.to(tl.float32)
    tl.store(out_ptr + n[None, :].to(tl.int64) * rows + k[:, None], w, mask=mask)


def awq_dequantize(
    qweight: torch.Tensor,  # [K, N / 8] int32
    qzeros: torch.Tensor,  # [G, N / 8] int32
    scales: torch.Tensor,  # [G, N]
    group_size: int,  # input rows per group; -1: one group of all K rows
) -> torch.Tensor:  # [N, K] float32
    """The reference op's signature and result (bit for bit: one float32 multiply)."""
    rows, words = qweight.shape
    cols = 8 * words
    group = rows if group_size == -1 else group_size
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    out = torch.empty((cols, rows), dtype=torch.float32, device=qweight.device)
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_K), triton.cdiv(cols, BLOCK_N))
    _awq_dequantize_kernel[grid](
        qweight,
        qzeros,
        scales,
        out,
        rows,
        cols,
        group,
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return out
