"""Shape buckets and step padding: pure host code, runs without torch_xla."""

from __future__ import annotations

import pytest

from kvrun.errors import ConfigError
from kvrun.scheduling.output import ScheduledChunk
from kvrun_tpu.attention import XlaPagedAttention
from kvrun_tpu.buckets import BucketSpec, next_bucket, power_of_two_buckets
from kvrun_tpu.runner import pad_batch

SPEC = BucketSpec(max_num_batched_tokens=100, max_num_seqs=5, max_model_len=30, block_size=8)


def test_power_of_two_buckets_cover_the_maximum() -> None:
    assert power_of_two_buckets(16, 100) == (16, 32, 64, 128)
    assert power_of_two_buckets(16, 16) == (16,)
    assert power_of_two_buckets(1, 5) == (1, 2, 4, 8)


def test_spec_shapes_and_padding() -> None:
    assert SPEC.token_buckets == (16, 32, 64, 128)
    assert SPEC.seq_buckets == (1, 2, 4, 8)
    assert SPEC.max_blocks_per_seq == 4
    assert len(SPEC.shapes()) == 16
    assert SPEC.pad(1, 1) == (16, 1)
    assert SPEC.pad(17, 3) == (32, 4)
    assert SPEC.pad(100, 5) == (128, 8)


def test_too_large_and_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError) as raised:
        next_bucket(129, SPEC.token_buckets, "tokens in one step")
    assert str(raised.value) == (
        "tokens in one step=129 exceeds the largest compiled bucket 128; "
        "buckets are 16, 32, 64, 128"
    )
    with pytest.raises(ConfigError) as raised:
        BucketSpec(max_num_batched_tokens=0, max_num_seqs=1, max_model_len=1, block_size=1)
    assert str(raised.value) == (
        "max_num_batched_tokens=0 is not accepted; it must be a positive int"
    )


def test_pad_batch_layout() -> None:
    chunks = [
        ScheduledChunk("a", [11, 12, 13], 8, [4, 6], samples=True, is_prefill=True),
        ScheduledChunk("b", [21], 2, [9], samples=True, is_prefill=False),
        ScheduledChunk("c", [31, 32], 0, [1], samples=False, is_prefill=True),
    ]
    batch = pad_batch(chunks, SPEC, num_blocks=10)
    meta = batch.meta
    pad = [0] * 10
    assert batch.input_ids.tolist() == [11, 12, 13, 21, 31, 32, *pad]
    assert batch.positions.tolist() == [8, 9, 10, 2, 0, 1, *pad]
    # Real tokens: block 6 offsets 0-2, block 9 offset 2, block 1 offsets 0-1; padding in
    # the sink block 10 (slots 80-87).
    assert meta.slot_mapping.tolist() == [48, 49, 50, 74, 8, 9, *range(80, 88), 80, 81]
    assert meta.token_seq.tolist() == [0, 0, 0, 1, 2, 2, *pad]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 6, 6]
    assert meta.seq_lens.tolist() == [11, 3, 2, 0]
    assert meta.block_tables.tolist() == [[4, 6, 0, 0], [9, 0, 0, 0], [1, 0, 0, 0], [0] * 4]
    assert meta.num_seqs_device.tolist() == [3]
    assert (batch.sample_indices.tolist(), batch.sample_chunks) == ([2, 3, 0, 0], [0, 1])
    assert (meta.num_tokens, meta.query_lens, meta.seq_lens_host) == (6, [3, 1, 2], [11, 3, 2])


def test_cache_shape_has_the_sink_block_and_combined_heads() -> None:
    assert XlaPagedAttention.kv_cache_shape(10, 8, 2, 64) == (11, 8, 4, 64)
