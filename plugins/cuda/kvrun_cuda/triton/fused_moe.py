"""The mixture-of-experts MLP in Triton: the ``fused_moe`` and ``prepare_experts`` ops
(their twins: kvrun.ops.reference).

The experts of one projection are one ``[E, N, K]`` tensor (``prepare_experts`` stacks
them once, at load). A call runs in four steps, as vLLM's fused-MoE kernel is laid out:

1. **Alignment** (:func:`align_block_size`): the ``T * K`` (token, slot) pairs, numbered
   ``t * K + slot``, are sorted by expert, and each expert's group is padded to a
   multiple of ``BLOCK_M`` with the sentinel ``T * K``, so that every tile of
   ``BLOCK_M`` rows of the sorted list belongs to one expert. The result also names the
   expert of each tile and the padded total. It runs in torch
   (:func:`align_block_size_torch`, the default) or, under
   VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON=1, in Triton (:func:`align_block_size_triton`:
   a counting sort, per-expert counters bumped with atomics). Neither reads anything back
   to the host, so the op launches without a synchronisation.
2. **Gate-up GEMM with SiLU-and-mul**: one program per tile of sorted rows and tile of
   ``I`` columns reads its expert's gate and up rows once for all of the tile's tokens
   and applies ``silu(gate) * up`` before it stores (the ``[T * K, 2I]`` product never
   reaches memory); row ``p`` of the ``[T * K, I]`` result belongs to pair ``p`` (token
   ``p // K``). Values are rounded to the dtype where the reference's linear, F.silu and
   product round.
3. **Down GEMM**, the same kernel reading the pairs' own rows, each result rounded to the
   dtype and multiplied by the pair's routing weight in float32 (as the reference
   scales).
4. **The sum** of each token's ``K`` rows (torch).

The order in which the Triton alignment lists one expert's pairs depends on the order
the atomics land in, but every pair's row is computed from its own inputs only, so the
result does not depend on it. Tiles past the padded total exit at once: the grid is sized
by the largest possible total, which needs no host read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kvrun.ops import reference
from kvrun_cuda.triton.launch import SUM, kernel

__all__ = [
    "Alignment",
    "MoeConfig",
    "align_block_size",
    "align_block_size_torch",
    "align_block_size_triton",
    "fused_moe",
    "moe_config",
    "prepare_experts",
]

PAIR_BLOCK = 256  # pairs per program of the counting and scattering kernels


def tiles_per_program(block_e: int) -> int:
    """Tiles per program of the tile-expert kernel, which compares each with every
    expert's end: at most 128, and at most 16384 comparisons per program."""
    return max(1, min(128, 16384 // block_e))


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of the grouped GEMM (vLLM's defaults for a kernel without tuned configs)."""

    block_m: int  # sorted rows per tile: every expert's group is padded to a multiple of it
    block_n: int
    block_k: int
    num_warps: int = 4


def moe_config(tokens: int, num_experts: int) -> MoeConfig:
    """Small tiles when there are few tokens per expert (decode: padding each group to 64
    rows would waste most of the work), larger ones for prefills."""
    if tokens <= num_experts:
        return MoeConfig(block_m=16, block_n=32, block_k=64)
    return MoeConfig(block_m=64, block_n=64, block_k=32)


@dataclass(frozen=True)
class Alignment:
    """The (token, slot) pairs sorted by expert and padded per expert to whole tiles.

    Invariants: ``sorted_pairs`` lists each pair ``0 <= p < T * K`` exactly once, the
    pairs of expert ``e`` in one run starting at a multiple of ``block_m``, followed by
    the sentinel ``T * K`` up to the next multiple; experts in increasing order, those
    with no pair taking no room. ``tile_experts[i]`` is the expert of tile ``i`` (rows
    ``i * block_m ...``), -1 for tiles at or past ``total[0]``, the padded length.
    """

    sorted_pairs: torch.Tensor  # [max_tiles * block_m] int32
    tile_experts: torch.Tensor  # [max_tiles] int32
    total: torch.Tensor  # [1] int32, on the device


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Tiles the padded list can need: each expert that has a pair (at most
    ``min(E, pairs)`` of them) adds at most ``block_m - 1`` rows of padding."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return bound // block_m


def align_block_size_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The alignment in torch ops (a stable sort: each expert's pairs in pair order)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its size back
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat.index_select(0, order)
    first = torch.cumsum(counts, 0) - counts  # each expert's first place in ``order``
    rank = torch.arange(pairs, device=device) - first.index_select(0, expert_of)
    dest = (ends - padded).index_select(0, expert_of) + rank
    tiles = max_tiles(pairs, num_experts, block_m)
    sorted_pairs = torch.full((tiles * block_m,), pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(tiles, device=device) * block_m
    tile_experts = torch.searchsorted(ends, starts, right=True)
    tile_experts = torch.where(tile_experts < num_experts, tile_experts, -1).to(torch.int32)
    return Alignment(sorted_pairs, tile_experts, ends[-1:].to(torch.int32))


@kernel
def _count_kernel(
    ids_ptr,  # [P] int64: each pair's expert
    counts_ptr,  # [E] int32, zeroed
    num_pairs,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pairs < num_pairs
    experts = tl.load(ids_ptr + pairs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + experts, tl.full((BLOCK,), 1, tl.int32), mask=mask)


@kernel
def _offsets_kernel(
    counts_ptr,  # [E] int32
    cursor_ptr,  # [E] int32: written, each expert's first padded row
    ends_ptr,  # [E] int32: written, each expert's group end (padded)
    total_ptr,  # [1] int32: written
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    experts = tl.arange(0, BLOCK_E)
    mask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=mask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.associative_scan(padded, 0, SUM)
    tl.store(cursor_ptr + experts, ends - padded, mask=mask)
    tl.store(ends_ptr + experts, ends, mask=mask)
    tl.store(total_ptr + experts * 0, ends, mask=experts == num_experts - 1)  # the last end


@kernel
def _tile_experts_kernel(
    ends_ptr,  # [E] int32
    total_ptr,  # [1] int32
    tile_experts_ptr,  # [tiles] int32: written
    num_tiles,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    tiles = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    # An expert ends at or before a tile's first row for every expert before the tile's.
    ends = tl.load(ends_ptr + experts, mask=experts < num_experts, other=2**30)
    before = (ends[None, :] <= tiles[:, None] * BLOCK_M).to(tl.int32)
    expert = tl.reduce(before, 1, SUM)
    total = tl.load(total_ptr)
    expert = tl.where(tiles * BLOCK_M < total, expert, -1)
    tl.store(tile_experts_ptr + tiles, expert, mask=tiles < num_tiles)


@kernel
def _scatter_kernel(
    ids_ptr,  # [P] int64
    cursor_ptr,  # [E] int32: each expert's next free row, bumped here
    sorted_ptr,  # [tiles * BLOCK_M] int32: sentinel-filled; the pairs written here
    num_pairs,
    BLOCK: tl.constexpr,
):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pairs < num_pairs
    experts = tl.load(ids_ptr + pairs, mask=mask, other=0)
    rows = tl.atomic_add(cursor_ptr + experts, tl.full((BLOCK,), 1, tl.int32), mask=mask)
    tl.store(sorted_ptr + rows, pairs.to(tl.int32), mask=mask)


def align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """The alignment in four Triton launches: count the pairs per expert; pad and prefix-
    sum the counts (one program); each tile's expert; scatter each pair to its expert's
    next free row."""
    flat = topk_ids.reshape(-1).to(torch.int64).contiguous()
    pairs, device = flat.numel(), flat.device
    tiles = max_tiles(pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    sorted_pairs = torch.full((tiles * block_m,), pairs, dtype=torch.int32, device=device)
    tile_experts = torch.empty(tiles, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    pair_grid = (triton.cdiv(pairs, PAIR_BLOCK),)
    _count_kernel[pair_grid](flat, counts, pairs, BLOCK=PAIR_BLOCK)
    _offsets_kernel[(1,)](
        counts, cursor, ends, total, num_experts, BLOCK_M=block_m, BLOCK_E=block_e
    )
    block_t = tiles_per_program(block_e)
    _tile_experts_kernel[(triton.cdiv(tiles, block_t),)](
        ends,
        total,
        tile_experts,
        tiles,
        num_experts,
        BLOCK_M=block_m,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    _scatter_kernel[pair_grid](flat, cursor, sorted_pairs, pairs, BLOCK=PAIR_BLOCK)
    return Alignment(sorted_pairs, tile_experts, total)


def align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, *, in_triton: bool
) -> Alignment:
    """vLLM's ``moe_align_block_size``; ``in_triton``: VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON."""
    align = align_block_size_triton if in_triton else align_block_size_torch
    return align(topk_ids, num_experts, block_m)


@kernel
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: hidden [T, H] (TOP_K = K) or one row per pair [T * K, I] (TOP_K = 1)
    b_ptr,  # [E, N, K] (GATED: [E, 2N, K], gate rows then up rows): the experts' matrices
    c_ptr,  # [T * K, N] contiguous: one row per pair
    weight_ptr,  # [T * K] float32: each pair's routing weight (read when MUL_WEIGHT)
    sorted_ptr,  # [tiles * BLOCK_M] int32: Alignment.sorted_pairs
    tile_experts_ptr,  # [tiles] int32
    total_ptr,  # [1] int32
    n,  # output columns
    k,
    num_pairs,
    a_row,
    b_expert,
    b_row,
    TOP_K: tl.constexpr,  # pairs per token: a pair's row of A is pair // TOP_K
    GATED: tl.constexpr,  # out = silu(A @ gate^T) * (A @ up^T), SiLU-and-mul in the epilogue
    MUL_WEIGHT: tl.constexpr,  # out *= the pair's routing weight
    IEEE: tl.constexpr,  # float32: exact products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile * BLOCK_M < tl.load(total_ptr):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + rows)
        valid = pairs < num_pairs
        pairs = tl.where(valid, pairs, 0).to(tl.int64)
        expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
        a_rows = pairs // TOP_K
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        # [BLOCK_K, BLOCK_N] tiles of the expert's rows ``cols`` (and ``n + cols``), transposed
        b_cols = b_ptr + expert * b_expert + cols[None, :].to(tl.int64) * b_row
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # GATED only
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k
            a_mask = valid[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + a_rows[:, None] * a_row + ks[None, :], mask=a_mask, other=0.0)
            b_mask = k_ok[:, None] & col_ok[None, :]
            b = tl.load(b_cols + ks[:, None], mask=b_mask, other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee") if IEEE else tl.dot(a, b, acc)
            if GATED:
                up = tl.load(b_cols + n * b_row + ks[:, None], mask=b_mask, other=0.0)
                acc_up = (
                    tl.dot(a, up, acc_up, input_precision="ieee") if IEEE else tl.dot(a, up, acc_up)
                )
        dtype = c_ptr.dtype.element_ty
        if GATED:  # rounded as the reference's linear, F.silu and product round
            gate = acc.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
        else:
            out = acc.to(dtype)
        if MUL_WEIGHT:  # the product rounded to the dtype, scaled in float32, as the reference
            w = tl.load(weight_ptr + pairs, mask=valid, other=0.0)
            out = (out.to(tl.float32) * w[:, None]).to(dtype)
        c_mask = valid[:, None] & col_ok[None, :]
        tl.store(c_ptr + pairs[:, None] * n + cols[None, :], out, mask=c_mask)


def _grouped_gemm(
    a: torch.Tensor,  # [rows, K] unit last stride
    b: torch.Tensor,  # [E, N, K] (gated: [E, 2N, K]) unit last stride
    alignment: Alignment,
    config: MoeConfig,
    *,
    top_k: int,
    num_pairs: int,
    gated: bool = False,
    weights: torch.Tensor | None = None,  # [T * K] float32
) -> torch.Tensor:  # [T * K, N]: row p = pair p's expert applied to its row of a
    n = b.shape[1] // 2 if gated else b.shape[1]
    out = torch.empty((num_pairs, n), dtype=a.dtype, device=a.device)
    grid = (alignment.tile_experts.numel(), triton.cdiv(n, config.block_n))
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        out if weights is None else weights,  # unread without MUL_WEIGHT
        alignment.sorted_pairs,
        alignment.tile_experts,
        alignment.total,
        n,
        b.shape[2],
        num_pairs,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        TOP_K=top_k,
        GATED=gated,
        MUL_WEIGHT=weights is not None,
        IEEE=a.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    return out


def prepare_experts(matrices: Sequence[Any]) -> Any:  # [E] x [N, K] -> [E, N, K]
    """The experts of one projection as one contiguous ``[E, N, K]`` tensor, what the
    kernel reads; a list it cannot stack (matrices another op prepared into something
    else than a tensor, or of different shapes) stays a list, which ``fused_moe`` hands
    to the reference."""
    first = matrices[0] if matrices else None
    stackable = isinstance(first, torch.Tensor) and all(
        isinstance(m, torch.Tensor)
        and m.dim() == 2
        and m.shape == first.shape
        and m.dtype == first.dtype
        and m.device == first.device
        for m in matrices
    )
    return torch.stack(list(matrices)) if stackable else list(matrices)


def _stacked(w: Any) -> bool:
    return isinstance(w, torch.Tensor) and w.dim() == 3 and w.stride(2) == 1


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    w13: Any,  # [E, 2I, H] as prepare_experts made it
    w2: Any,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int64
    *,
    align_in_triton: bool = False,  # VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON
) -> torch.Tensor:  # [T, H] in hidden's dtype
    """The reference op's result through the grouped Triton GEMMs (see the module's
    docstring); experts given as lists (prepare_experts was disabled, or could not stack
    them) or in another dtype than ``hidden`` run the reference."""
    if not (_stacked(w13) and _stacked(w2)) or not (hidden.dtype == w13.dtype == w2.dtype):
        return reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return torch.zeros_like(hidden)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    num_experts, num_pairs = w13.shape[0], tokens * top_k
    config = moe_config(tokens, num_experts)
    alignment = align_block_size(topk_ids, num_experts, config.block_m, in_triton=align_in_triton)
    act = _grouped_gemm(
        hidden, w13, alignment, config, top_k=top_k, num_pairs=num_pairs, gated=True
    )
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    down = _grouped_gemm(act, w2, alignment, config, top_k=1, num_pairs=num_pairs, weights=weights)
    return down.view(tokens, top_k, -1).sum(dim=1)
