"""Paged attention in one Triton kernel: decodes, prefills, chunked prefills, prefix hits.

Cache layout (one layer's key or value half): ``[num_blocks, block_size, Hk, D]``,
the reference's own layout, so a token's keys for all kv heads are one contiguous
row and the reference ops run on the same tensors unchanged.

How the work is cut. A program owns one (request, tile of query tokens, kv head).
Its BLOCK_M query rows are BLOCK_M // GROUP_PAD tokens times the GROUP_PAD query
heads that share that kv head (GROUP padded to a power of two), so grouped-query
attention reads each K/V tile once for the whole group and never repeats K/V. The
program walks the request's context from position 0 in tiles of TILE tokens, finding
each token's slot through the block table (any block size works), and keeps an
online softmax (running max and sum in fp32, rescaled as the max grows). Query token
j of a request with context length S and query length Q sits at position S - Q + j
and sees positions 0..S - Q + j: the same rule covers decode (Q = 1), a whole-prompt
prefill (Q = S) and a chunk or a prefill after a prefix hit (0 < Q < S). The loop
stops at the last position the tile's latest token may see.

Decode-only batches too small to fill the GPU split each context over several
programs (flash-decoding): each writes an unnormalised partial output with its
running max and sum, and a second kernel merges the splits.

fp8 caches (e4m3fn, or e4m3fnuz on AMD MI300) are read with a per-layer scale each for
keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvrun_cuda.fp8 import FP8_KV_DTYPES
from kvrun_cuda.triton.launch import MAX, SUM, kernel

__all__ = [
    "MAX_SPLITS",
    "PagedAttentionConfig",
    "decode_splits",
    "paged_attention_config",
    "unified_attention",
]

_LOG2E = 1.4426950408889634


@kernel
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hk, D]
    v_cache_ptr,  # same shape and strides as the key cache
    out_ptr,  # [T, Hq, D]
    tables_ptr,  # [B, max_blocks] int
    seq_lens_ptr,  # [B] int: context length after this step
    query_start_ptr,  # [B + 1] int: cumulative query lengths
    part_acc_ptr,  # [B, splits, Hq, D] fp32: unnormalised partial outputs (SPLIT only)
    part_m_ptr,  # [B, splits, Hq] fp32: partial running max, log2 units (SPLIT only)
    part_l_ptr,  # [B, splits, Hq] fp32: partial softmax denominators (SPLIT only)
    scale_log2,  # softmax scale times log2(e): the kernel exponentiates with exp2
    k_scale,  # fp8 caches: original = stored * scale (1.0 otherwise)
    v_scale,
    q_tok,
    q_head,
    o_tok,
    o_head,
    c_block,
    c_slot,
    c_head,
    t_row,
    block_size,
    num_heads,
    num_splits,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two, at least 16 (tl.dot)
    BLOCK_M: tl.constexpr,  # query rows per program: tokens * GROUP_PAD, at least 16
    TILE: tl.constexpr,  # context tokens per loop step, at least 16
    SPLIT: tl.constexpr,  # decode-only: axis 1 of the grid splits the context, not the queries
    DEQUANT: tl.constexpr,  # the caches are fp8: scale each K/V tile up to the query's dtype
):
    seq = tl.program_id(0)
    if SPLIT:
        q_tile = 0
        split = tl.program_id(1)
    else:
        q_tile = tl.program_id(1)
        split = 0
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = q_tile * (BLOCK_M // GROUP_PAD)  # first query token (within the request) of this tile
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # tokens before this step's queries
    # The tile's last token sees positions up to kv_end - 1.
    kv_end = cached + tl.minimum(first + BLOCK_M // GROUP_PAD, q_len)
    kv_lo = 0
    if SPLIT:
        # Each split takes a whole number of tiles of this request's own context, so the
        # split count alone (not the lengths) shapes the launch: graph-safe. Splits past
        # a short context's end do nothing; the merge skips them by the same arithmetic.
        split_len = ((kv_end + num_splits - 1) // num_splits + TILE - 1) // TILE * TILE
        kv_lo = split * split_len
        kv_end = tl.minimum(kv_end, kv_lo + split_len)
    if (first < q_len) & (kv_lo < kv_end):
        rows = tl.arange(0, BLOCK_M)
        tok = first + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (tok < q_len) & (g < GROUP)
        head = kv_head * GROUP + g
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * q_tok + head[:, None] * q_head + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        q_pos = cached + tok  # [BLOCK_M] absolute position of each row's token
        table = tables_ptr + seq.to(tl.int64) * t_row
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # finite: fully masked tiles stay NaN-free
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc = tl.full((BLOCK_M, D_PAD), 0.0, tl.float32)
        for n0 in range(kv_lo, kv_end, TILE):
            n = n0 + tl.arange(0, TILE)
            n_ok = n < kv_end
            block = tl.load(table + n // block_size, mask=n_ok, other=0).to(tl.int64)
            slot = block * c_block + (n % block_size) * c_slot + kv_head * c_head
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if DEQUANT:
                # As the fp8 oracle does: stored * scale in fp32, rounded to the query dtype.
                k = (k.to(tl.float32) * k_scale).to(q.dtype)
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
            # fp32 inputs are multiplied in full precision, not TF32: they are the oracle's.
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, MAX))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, SUM)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(q.dtype), v.to(q.dtype), input_precision="ieee"
            )
            m_i = m_new
        if SPLIT:
            part = (seq * num_splits + split).to(tl.int64) * num_heads + head
            tl.store(part_m_ptr + part, m_i, mask=row_ok)
            tl.store(part_l_ptr + part, l_i, mask=row_ok)
            tl.store(
                part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
                acc,
                mask=row_ok[:, None] & d_ok[None, :],
            )
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * o_tok + head[:, None] * o_head + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )


@kernel
def _merge_splits_kernel(
    part_acc_ptr,  # [B, splits, Hq, D] fp32
    part_m_ptr,  # [B, splits, Hq] fp32
    part_l_ptr,  # [B, splits, Hq] fp32
    out_ptr,  # [T, Hq, D]
    query_start_ptr,  # [B + 1] int: each decode's token index
    seq_lens_ptr,  # [B] int: context lengths, to tell which splits ran
    o_tok,
    o_head,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # num_splits rounded up to a power of two
    TILE: tl.constexpr,  # the attention kernel's TILE: splits are whole tiles
):
    # One program per (decode, query head): rescale each split to the global max, sum.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = ((seq_len + num_splits - 1) // num_splits + TILE - 1) // TILE * TILE
    sp_ok = (sp < num_splits) & (sp * split_len < seq_len)  # the splits that wrote partials
    part = (seq * num_splits + sp).to(tl.int64) * num_heads + head
    m = tl.load(part_m_ptr + part, mask=sp_ok, other=-1.0e30)
    den = tl.load(part_l_ptr + part, mask=sp_ok, other=0.0)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=sp_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    w = tl.exp2(m - tl.reduce(m, 0, MAX))
    total = tl.reduce(w * den, 0, SUM)
    out = tl.reduce(w[:, None] * acc, 0, SUM) / tl.where(total > 0, total, 1.0)
    token = tl.load(query_start_ptr + seq).to(tl.int64)
    tl.store(
        out_ptr + token * o_tok + head * o_head + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_ok,
    )


@dataclass(frozen=True)
class PagedAttentionConfig:
    """The kernel's tile sizes and context split for one head layout and batch kind."""

    group: int  # query heads per kv head
    head_dim: int
    block_m: int  # query rows per program: a power of two, at least 16 and group_pad
    tile: int  # context tokens per loop step: a power of two, at least 16
    num_warps: int
    num_splits: int = 1  # decode-only: programs each request's context is split over

    @property
    def group_pad(self) -> int:
        return int(triton.next_power_of_2(self.group))

    @property
    def d_pad(self) -> int:
        return max(16, int(triton.next_power_of_2(self.head_dim)))

    @property
    def tokens_per_tile(self) -> int:
        """Query tokens per program."""
        return self.block_m // self.group_pad

    @property
    def split(self) -> bool:
        return self.num_splits > 1

    def constexprs(self) -> dict[str, int | bool]:
        return {
            "GROUP": self.group,
            "GROUP_PAD": self.group_pad,
            "HEAD_DIM": self.head_dim,
            "D_PAD": self.d_pad,
            "BLOCK_M": self.block_m,
            "TILE": self.tile,
            "SPLIT": self.split,
        }


# Decode batches with fewer (request, kv head) programs than this split each context
# so that a GPU's 100+ multiprocessors all get work (flash-decoding); at most MAX_SPLITS.
_SPLIT_BELOW_PROGRAMS = 128
MAX_SPLITS = 16


def decode_splits(num_seqs: int, num_kv_heads: int) -> int:
    """How many programs share one decode's context. From the batch shape alone, never
    the lengths, so a captured CUDA graph stays right as contexts grow."""
    programs = num_seqs * num_kv_heads
    if programs >= _SPLIT_BELOW_PROGRAMS:
        return 1
    return min(MAX_SPLITS, -(-2 * _SPLIT_BELOW_PROGRAMS // programs))


def paged_attention_config(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query_len: int,
    element_size: int = 2,
    num_splits: int = 1,
) -> PagedAttentionConfig:
    """Tiles for a batch: decode-only batches get one token per program, others 64 rows.

    fp32 (element_size 4) gets half the rows and context tokens: its tl.dot runs
    without tensor cores, fully unrolled, and a 64-row tile compiles 5x slower into 4x
    more code for no gain. ``num_splits`` > 1 is for decode-only batches.
    """
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert num_splits == 1 or max_query_len == 1, (num_splits, max_query_len)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    wide = element_size <= 2
    # Decode: one token per program; rows beyond the group are padding, 16 is tl.dot's minimum.
    rows = 16 if max_query_len == 1 else 64 if wide else 32
    block_m = max(rows, group_pad)
    # Bounds the K/V tile's registers at large heads.
    tile = 32 if head_dim <= 128 and wide else 16
    return PagedAttentionConfig(group, head_dim, block_m, tile, 4, num_splits)


def unified_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # same shape and strides as key_cache
    block_tables: torch.Tensor,  # [B, max_blocks] int, on the device
    seq_lens: torch.Tensor,  # [B] int, on the device: context length after this step
    query_start_loc: torch.Tensor,  # [B + 1] int, on the device: cumulative query lengths
    max_query_len: int,  # host copy of the longest query, sizes the grid
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D], written in place when given
    num_splits: int | None = None,  # decode-only batches: None = decode_splits(...)
    k_scale: float = 1.0,  # fp8 caches only: the layer's key scale
    v_scale: float = 1.0,  # fp8 caches only: the layer's value scale
) -> torch.Tensor:  # [T, Hq, D] in query's dtype
    """Causal attention of each request's new tokens over its paged context.

    Reads no device tensor back to the host: the launch depends on the shapes,
    ``max_query_len`` and the split count only. An fp8 cache (``float8_e4m3fn`` or
    ``float8_e4m3fnuz``) is read as ``stored * scale`` rounded to the query's dtype.
    """
    dequant = key_cache.dtype in FP8_KV_DTYPES
    if not dequant and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(
            f"k_scale={k_scale}, v_scale={v_scale} given for a {key_cache.dtype} cache; "
            "scales apply to fp8 caches only (float8_e4m3fn, float8_e4m3fnuz)"
        )
    if query.stride(-1) != 1:
        query = query.contiguous()
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1 and seq_lens.is_contiguous()
    assert query_start_loc.is_contiguous()
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len > 1:
        num_splits = 1
    elif num_splits is None:
        num_splits = decode_splits(num_seqs, num_kv_heads)
    cfg = paged_attention_config(
        num_heads, num_kv_heads, head_dim, max_query_len, query.element_size(), num_splits
    )
    if cfg.split:
        part_acc = torch.empty(
            (num_seqs, num_splits, num_heads, head_dim), dtype=torch.float32, device=query.device
        )
        part_m = torch.empty(
            (num_seqs, num_splits, num_heads), dtype=torch.float32, device=query.device
        )
        part_l = torch.empty_like(part_m)
        grid = (num_seqs, num_splits, num_kv_heads)
    else:
        part_acc = part_m = part_l = out  # unused: SPLIT is off
        grid = (num_seqs, triton.cdiv(max_query_len, cfg.tokens_per_tile), num_kv_heads)
    c_block, c_slot, c_head, _ = key_cache.stride()
    _paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        part_acc,
        part_m,
        part_l,
        scale * _LOG2E,
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        c_block,
        c_slot,
        c_head,
        block_tables.stride(0),
        block_size,
        num_heads,
        num_splits,
        num_warps=cfg.num_warps,
        DEQUANT=dequant,
        **cfg.constexprs(),
    )
    if cfg.split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_acc,
            part_m,
            part_l,
            out,
            query_start_loc,
            seq_lens,
            out.stride(0),
            out.stride(1),
            num_heads,
            num_splits,
            HEAD_DIM=head_dim,
            D_PAD=cfg.d_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            TILE=cfg.tile,
            num_warps=4,
        )
    return out
