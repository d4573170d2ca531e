"""Flat paged attention on the CPU equals the core's reference attention."""

from __future__ import annotations

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.engine.batch import build_batch
from kvrun.scheduling.output import ScheduledChunk
from kvrun.testing.attention_checks import LAYER_SPECS, SCENARIOS, Scenario, check_backend
from kvrun_hpu.attention import HpuFlatAttention, flat_paged_attention
from kvrun_hpu.buckets import BucketRange
from kvrun_hpu.decode_metadata import build_decode_metadata

BS = 4
NUM_BLOCKS = 16
CPU = torch.device("cpu")
SMALL_BATCHES = BucketRange(1, 2, 8)
SMALL_BLOCKS = BucketRange(2, 4, 12)

# (request, block table, tokens already cached); each decodes one token.
DECODES = [("a", [3, 7], 5), ("b", [1], 2), ("c", [0, 5, 2], 8), ("d", [9, 12, 15, 11], 13)]


def decode_chunks() -> list[ScheduledChunk]:
    return [
        ScheduledChunk(rid, [7], cached, table, samples=True, is_prefill=False)
        for rid, table, cached in DECODES
    ]


def shared_chunks() -> list[ScheduledChunk]:
    # b and c share a's first two blocks (a prefix-cache hit); each decodes one token.
    return [
        ScheduledChunk("a", [7], 9, [3, 7, 10], samples=True, is_prefill=False),
        ScheduledChunk("b", [7], 10, [3, 7, 1], samples=True, is_prefill=False),
        ScheduledChunk("c", [7], 8, [3, 7, 14], samples=True, is_prefill=False),
    ]


def mixed_chunks() -> list[ScheduledChunk]:
    prefill = ScheduledChunk("p", [1, 2, 3, 4, 5], 2, [4, 6], samples=True, is_prefill=True)
    return [*decode_chunks()[:2], prefill]


def qkv(num_tokens: int, spec: AttentionLayerSpec, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    heads = (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)
    return [torch.randn(num_tokens, h, spec.head_dim, generator=gen) for h in heads]


def random_cache(spec: AttentionLayerSpec) -> torch.Tensor:
    # Every block holds finite stale values, as a cache does after earlier requests.
    gen = torch.Generator().manual_seed(0)
    shape = HpuFlatAttention.kv_cache_shape(NUM_BLOCKS, BS, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=gen)


SPECS = [
    AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, scale=8**-0.5),  # GQA
    AttentionLayerSpec(num_heads=2, num_kv_heads=2, head_dim=16, scale=0.3),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("chunks", [decode_chunks, mixed_chunks])
def test_backend_matches_the_reference(
    spec: AttentionLayerSpec, contiguous: bool, chunks: object
) -> None:
    assert callable(chunks)
    meta = build_batch(chunks(), BS, CPU).meta
    query, key, value = qkv(meta.num_tokens, spec, seed=1)
    ours, theirs = random_cache(spec), random_cache(spec)
    backend = HpuFlatAttention(
        spec, contiguous=contiguous, batch_buckets=SMALL_BATCHES, block_buckets=SMALL_BLOCKS
    )
    got = backend.forward(query, key, value, ours, meta)
    want = ReferenceAttention(spec).forward(query, key, value, theirs, meta)
    assert got.shape == want.shape == (meta.num_tokens, spec.num_heads, spec.head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours, theirs)  # the same K/V written to the same slots


def test_shared_prefix_blocks_in_the_flat_layout() -> None:
    spec = SPECS[0]
    meta = build_batch(shared_chunks(), BS, CPU).meta
    query, key, value = qkv(meta.num_tokens, spec, seed=3)
    ours, theirs = random_cache(spec), random_cache(spec)
    backend = HpuFlatAttention(spec, batch_buckets=SMALL_BATCHES, block_buckets=SMALL_BLOCKS)
    got = backend.forward(query, key, value, ours, meta)
    assert backend.decode_metadata(meta, NUM_BLOCKS).block_list.tolist() == [
        *(3, 7, 10, 3, 7, 1, 3, 7, 14),
        0,
        0,
        0,
    ]
    want = ReferenceAttention(spec).forward(query, key, value, theirs, meta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_layout_per_step_is_shared_by_all_layers() -> None:
    backend = HpuFlatAttention(SPECS[0], contiguous=True, block_buckets=SMALL_BLOCKS)
    step1 = build_batch(decode_chunks(), BS, CPU).meta
    first = backend.decode_metadata(step1, NUM_BLOCKS)
    assert backend.decode_metadata(step1, NUM_BLOCKS) is first
    step2 = build_batch(decode_chunks(), BS, CPU).meta
    assert backend.decode_metadata(step2, NUM_BLOCKS) is not first
    # Highest block 15 -> 16 entries: bucket 16 is past max 12, the cache caps it at 16.
    assert first.block_list.tolist() == list(range(16))


def test_padded_batch_rows_come_out_zero_and_real_rows_unchanged() -> None:
    spec = SPECS[0]
    cache = random_cache(spec)
    tables = [table for _, table, _ in DECODES]
    seq_lens = [cached + 1 for _, _, cached in DECODES]
    meta = build_decode_metadata(
        tables,
        seq_lens,
        BS,
        NUM_BLOCKS,
        contiguous=False,
        batch_buckets=BucketRange(6, 6, 6),
        block_buckets=SMALL_BLOCKS,
        dtype=torch.float32,
        device=CPU,
    )
    query = qkv(6, spec, seed=2)[0]
    out = flat_paged_attention(query, cache[0], cache[1], meta, spec.scale)
    assert torch.equal(out[4:], torch.zeros(2, spec.num_heads, spec.head_dim))
    # The reference over the same context, with no new K/V to write.
    want = ReferenceAttention(spec).forward(
        query[:4],
        torch.zeros(0, 2, 8),
        torch.zeros(0, 2, 8),
        cache.clone(),
        AttentionMetadata(
            num_tokens=4,
            slot_mapping=torch.zeros(0, dtype=torch.int64),
            query_start_loc=torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (4 - len(t)) for t in tables]),
            query_lens=[1, 1, 1, 1],
            seq_lens_host=seq_lens,
            block_size=BS,
            max_query_len=1,
            max_seq_len=max(seq_lens),
        ),
    )
    torch.testing.assert_close(out[:4], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [spec for _, spec in LAYER_SPECS], ids=[n for n, _ in LAYER_SPECS])
@pytest.mark.parametrize(
    ("contiguous", "scenario"),
    # "prefix-hit" (the borrower reads its owner's blocks) on the flat layout only: under
    # VLLM_CONTIGUOUS_PA the platform turns prefix caching off, so no block is ever
    # shared, and the decode layout asserts that.
    [(c, s) for c in (False, True) for s in SCENARIOS if not (c and s.prefix)],
    ids=lambda x: x.name if isinstance(x, Scenario) else ("contiguous" if x else "flat"),
)
def test_the_conformance_kit_s_attention_scenarios(
    spec: AttentionLayerSpec, contiguous: bool, scenario: Scenario
) -> None:
    # The kit's cache starts as NaN: reading any slot that was never written fails it.
    backend = HpuFlatAttention(spec, contiguous=contiguous)
    check_backend(backend, scenario, torch.float32, CPU)
