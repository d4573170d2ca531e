"""Attention on the native kernels, for the backends and the paged_attention op.

The kernels (``csrc/attention.c``) walk each request's block table and read the cached
K/V rows in place; the torch path gathers each request's blocks into a buffer before
SDPA reads them, so every K/V byte crosses memory three times. Prefill runs each query
as decode would (its position + 1 rows of the cache, as stored, in position order), so
a prompt's outputs do not depend on how it was chunked, batched or prefix-cached.
"""

from __future__ import annotations

import torch

from kvrun_cpu.attention.plan import DecodeBatch, PrefillBatch
from kvrun_cpu.native import DTYPE_CODES, NativeKernels

__all__ = ["decode_batch", "prefill_batch", "runs_natively"]


def runs_natively(native: NativeKernels | None, query: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the native kernel takes this step's decodes (dtypes it reads, all one)."""
    return native is not None and query.dtype == cache.dtype and query.dtype in DTYPE_CODES


def decode_batch(
    native: NativeKernels,
    query: torch.Tensor,  # [T, Hq, D]: the step's new tokens, all requests
    key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], any strides
    value_cache: torch.Tensor,  # same shape and strides
    batch: DecodeBatch,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: the decode rows are written, the rest untouched
) -> None:
    low, high = batch.block_id_range
    # C does no bounds checks: a bad block id must fail here, not read stray memory.
    assert low >= 0 and high < key_cache.shape[1], (batch.block_id_range, key_cache.shape)
    tokens = batch.tokens
    if isinstance(tokens, slice):  # the kernel writes straight into out's rows
        q, rows = query[tokens], out[tokens]
    else:
        q = query.index_select(0, tokens)
        rows = torch.empty_like(q)
    native.paged_decode(q, key_cache, value_cache, batch.block_tables, batch.seq_lens, scale, rows)
    if not isinstance(tokens, slice):
        out.index_copy_(0, tokens, rows)


def prefill_batch(
    native: NativeKernels,
    query: torch.Tensor,  # [T, Hq, D]: the step's new tokens, all requests
    key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], any strides
    value_cache: torch.Tensor,  # same shape and strides; the step's K/V already written
    batch: PrefillBatch,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: the prefill rows are written, the rest untouched
) -> None:
    low, high = batch.block_id_range
    # C does no bounds checks: a bad block id must fail here, not read stray memory.
    assert low >= 0 and high < key_cache.shape[1], (batch.block_id_range, key_cache.shape)
    native.paged_prefill(
        query,
        key_cache,
        value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.q_starts,
        batch.q_lens,
        scale,
        out,
    )
