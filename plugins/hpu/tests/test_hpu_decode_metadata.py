"""The flat and contiguous decode layouts, worked out by hand for one batch.

The batch (block_size 4): A holds blocks [3, 7] and 6 tokens, B holds [1] and 3, C holds
[0, 5, 2] and 9. Blocks per sequence: A 2 (4 + 2 used slots), B 1 (3), C 3 (4 + 4 + 1).
"""

from __future__ import annotations

import pytest
import torch

from kvrun_hpu.buckets import BucketRange
from kvrun_hpu.decode_metadata import (
    DecodeBlockLayout,
    build_decode_metadata,
    decode_block_layout,
)

BS = 4
TABLES = [[3, 7], [1], [0, 5, 2, 9]]  # C's table holds one block more than it uses
SEQ_LENS = [6, 3, 9]
BATCH_BUCKETS = BucketRange(1, 2, 8)  # 1, 2, 4, 6, 8: three sequences pad to 4 rows
BLOCK_BUCKETS = BucketRange(2, 4, 12)  # 2, 4, 8, 12
NEG = float("-inf")


def layout(contiguous: bool, num_blocks: int = 16) -> DecodeBlockLayout:
    return decode_block_layout(
        TABLES,
        SEQ_LENS,
        BS,
        num_blocks,
        contiguous=contiguous,
        batch_buckets=BATCH_BUCKETS,
        block_buckets=BLOCK_BUCKETS,
    )


def test_flat_layout_lists_each_sequence_s_used_blocks_then_padding() -> None:
    # Six entries pad to the bucket of 8 with block 0, group -1, usage 1.
    assert layout(contiguous=False) == DecodeBlockLayout(
        block_list=[3, 7, 1, 0, 5, 2, 0, 0],
        block_groups=[0, 0, 1, 2, 2, 2, -1, -1],
        block_usage=[4, 2, 3, 4, 4, 1, 1, 1],
        batch_size=4,
    )


def test_contiguous_layout_covers_block_ids_zero_to_the_highest_used() -> None:
    # Highest used id 7: the range 0..7 is 8 entries, a bucket already. Entry i is block
    # i; blocks 4 and 6 are unused in the range and become padding.
    assert layout(contiguous=True) == DecodeBlockLayout(
        block_list=[0, 1, 2, 3, 4, 5, 6, 7],
        block_groups=[2, 1, 2, 0, -1, 2, -1, 0],
        block_usage=[4, 3, 1, 4, 1, 4, 1, 2],
        batch_size=4,
    )


def test_contiguous_range_never_passes_the_cache() -> None:
    # Block 8 in use: 9 entries pad to the bucket 12, but a 10-block cache caps it at 10.
    got = decode_block_layout(
        [[8], [2]],
        [1, 4],
        BS,
        10,
        contiguous=True,
        batch_buckets=BATCH_BUCKETS,
        block_buckets=BLOCK_BUCKETS,
    )
    assert got == DecodeBlockLayout(
        block_list=list(range(10)),
        block_groups=[-1, -1, 1, -1, -1, -1, -1, -1, 0, -1],
        block_usage=[1, 1, 4, 1, 1, 1, 1, 1, 1, 1],
        batch_size=2,
    )


def test_contiguous_layout_refuses_a_block_shared_by_two_sequences() -> None:
    with pytest.raises(AssertionError, match=r"contiguous PA with shared blocks: \[4, 4, 5\]"):
        decode_block_layout(
            [[4], [4, 5]],
            [2, 6],
            BS,
            16,
            contiguous=True,
            batch_buckets=BATCH_BUCKETS,
            block_buckets=BLOCK_BUCKETS,
        )


@pytest.mark.parametrize("contiguous", [False, True])
def test_tensors_carry_the_layout_the_one_hot_mapping_and_the_slot_mask(
    contiguous: bool,
) -> None:
    meta = build_decode_metadata(
        TABLES,
        SEQ_LENS,
        BS,
        16,
        contiguous=contiguous,
        batch_buckets=BATCH_BUCKETS,
        block_buckets=BLOCK_BUCKETS,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    lists = layout(contiguous)
    assert meta.block_list.dtype == meta.block_groups.dtype == torch.int32
    assert meta.block_list.tolist() == lists.block_list
    assert meta.block_groups.tolist() == lists.block_groups
    assert meta.block_usage.tolist() == lists.block_usage
    assert (meta.num_seqs, meta.batch_size, meta.contiguous) == (3, 4, contiguous)
    rows = {0: [1, 0, 0, 0], 1: [0, 1, 0, 0], 2: [0, 0, 1, 0], -1: [0, 0, 0, 0]}
    masks = {4: [0, 0, 0, 0], 3: [0, 0, 0, NEG], 2: [0, 0, NEG, NEG], 1: [0, NEG, NEG, NEG]}
    assert meta.block_mapping.dtype == meta.block_bias.dtype == torch.bfloat16
    assert meta.block_mapping.tolist() == [rows[g] for g in lists.block_groups]
    assert meta.block_bias.tolist() == [masks[u] for u in lists.block_usage]
