"""Decode metadata in the layout Gaudi's flat paged attention takes, built on the host.

Instead of a padded ``[batch, max_blocks]`` block table, flat paged attention walks one
list of blocks for the whole batch. Each entry says which cache block to read, which
batch row it belongs to and how many of its slots hold tokens:

- flat layout: the sequences' blocks one after the other, padded to a block bucket;
- contiguous layout (``VLLM_CONTIGUOUS_PA``): entry ``i`` is cache block ``i`` for every
  ``i`` in ``[0, max used block]`` (padded to a bucket), so the device reads one slice of
  the cache instead of gathering; unused blocks in the range are padding. This needs each
  block to belong to one sequence at most, which is why prefix caching is off under it,
  and it stays short only if the allocator keeps used ids low (``LowestIdFirst``).

Everything here is pure: plain lists in, tensors out, no device-specific call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrun_hpu.buckets import BucketRange, pad_to_bucket

__all__ = [
    "PAD_BLOCK_ID",
    "DecodeBlockLayout",
    "HpuDecodeMetadata",
    "build_decode_metadata",
    "decode_block_layout",
]

# Padding entries read this block; their zero block_mapping row drops what they read.
PAD_BLOCK_ID = 0


@dataclass(frozen=True)
class DecodeBlockLayout:
    """The host-side lists behind :class:`HpuDecodeMetadata`, each of the same length NB."""

    block_list: list[int]  # [NB] cache block of each entry
    block_groups: list[int]  # [NB] batch row owning the entry; -1 = padding
    block_usage: list[int]  # [NB] slots of the block holding tokens, 1..block_size; 1 = padding
    batch_size: int  # B: the number of sequences padded to a batch bucket


@dataclass(frozen=True)
class HpuDecodeMetadata:
    """One decode step's block layout as tensors on the device, shared by all layers."""

    block_list: torch.Tensor  # [NB] int32 cache block per entry
    block_groups: torch.Tensor  # [NB] int32 batch row per entry, -1 for padding
    block_usage: torch.Tensor  # [NB] int32 used slots per entry (1 for padding)
    block_mapping: torch.Tensor  # [NB, B] dtype one-hot of block_groups; zero rows = padding
    block_bias: torch.Tensor  # [NB, block_size] dtype 0 for used slots, -inf for the rest
    num_seqs: int  # real sequences; batch rows num_seqs..B-1 are padding
    contiguous: bool  # block_list is 0..NB-1, so the cache may be sliced instead of gathered

    @property
    def batch_size(self) -> int:
        return int(self.block_mapping.shape[1])


def _usage(seq_len: int, block_size: int) -> list[int]:
    """Used slots of each block of a sequence of seq_len tokens: full blocks, then the rest."""
    n = -(-seq_len // block_size)
    return [block_size] * (n - 1) + [seq_len - (n - 1) * block_size]


def decode_block_layout(
    block_tables: Sequence[Sequence[int]],  # [S][>= ceil(seq_len / block_size)] block ids
    seq_lens: Sequence[int],  # [S] tokens in each sequence, the one decoded now included
    block_size: int,
    num_blocks: int,  # blocks in the cache: a contiguous range never passes it
    *,
    contiguous: bool,
    batch_buckets: BucketRange,
    block_buckets: BucketRange,
) -> DecodeBlockLayout:
    """The block entries of a decode batch, padded to buckets (see the module docstring)."""
    assert len(block_tables) == len(seq_lens) > 0, (len(block_tables), len(seq_lens))
    blocks: list[int] = []
    groups: list[int] = []
    usage: list[int] = []
    for row, (table, seq_len) in enumerate(zip(block_tables, seq_lens, strict=True)):
        used = _usage(seq_len, block_size)
        assert seq_len >= 1 and len(table) >= len(used), (row, seq_len, len(table))
        blocks.extend(table[: len(used)])
        groups.extend([row] * len(used))
        usage.extend(used)
    batch_size = pad_to_bucket(len(seq_lens), batch_buckets)
    if not contiguous:
        size = pad_to_bucket(len(blocks), block_buckets)
        pad = size - len(blocks)
        return DecodeBlockLayout(
            blocks + [PAD_BLOCK_ID] * pad, groups + [-1] * pad, usage + [1] * pad, batch_size
        )
    # One entry per block id: a shared block would need two rows at once.
    assert len(set(blocks)) == len(blocks), f"contiguous PA with shared blocks: {blocks}"
    # The bucket may overshoot the cache; the cache size itself is then the shape.
    size = min(pad_to_bucket(max(blocks) + 1, block_buckets), num_blocks)
    assert max(blocks) < size, (max(blocks), size, num_blocks)
    range_groups = [-1] * size
    range_usage = [1] * size
    for block_id, row, n in zip(blocks, groups, usage, strict=True):
        range_groups[block_id] = row
        range_usage[block_id] = n
    return DecodeBlockLayout(list(range(size)), range_groups, range_usage, batch_size)


def build_decode_metadata(
    block_tables: Sequence[Sequence[int]],  # [S][>= ceil(seq_len / block_size)] block ids
    seq_lens: Sequence[int],  # [S] tokens in each sequence, the one decoded now included
    block_size: int,
    num_blocks: int,
    *,
    contiguous: bool,
    batch_buckets: BucketRange,
    block_buckets: BucketRange,
    dtype: torch.dtype,
    device: torch.device,
) -> HpuDecodeMetadata:
    """:func:`decode_block_layout` as device tensors, plus the mapping and the slot mask."""
    layout = decode_block_layout(
        block_tables,
        seq_lens,
        block_size,
        num_blocks,
        contiguous=contiguous,
        batch_buckets=batch_buckets,
        block_buckets=block_buckets,
    )
    block_list = torch.tensor(layout.block_list, dtype=torch.int32, device=device)
    groups = torch.tensor(layout.block_groups, dtype=torch.int32, device=device)
    usage = torch.tensor(layout.block_usage, dtype=torch.int32, device=device)
    # one_hot rejects -1, so padding goes to an extra column that is then cut off.
    rows = torch.where(groups < 0, layout.batch_size, groups).long()
    mapping = torch.nn.functional.one_hot(rows, layout.batch_size + 1)[:, : layout.batch_size]
    slots = torch.arange(block_size, dtype=torch.int32, device=device)
    unused = slots.unsqueeze(0) >= usage.unsqueeze(1)  # [NB, block_size]
    bias = torch.zeros(unused.shape, dtype=dtype, device=device).masked_fill_(unused, float("-inf"))
    return HpuDecodeMetadata(
        block_list=block_list,
        block_groups=groups,
        block_usage=usage,
        block_mapping=mapping.to(dtype),
        block_bias=bias,
        num_seqs=len(seq_lens),
        contiguous=contiguous,
    )
