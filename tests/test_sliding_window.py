"""Sliding windows in the block manager and the scheduler: a model whose every layer sees
only the last W positions releases a running request's blocks that fell out of the
window, so a request holds a bounded number of blocks however long it grows.

The scheduler tests drive it with a stand-in windowed model that writes each chunk's
tokens through the block table into a paged slot store and samples from the last W
slots read back the same way: a block released while still in the window (and reused
by another request) or a wrong table entry changes the generated tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.engine.builder import released_window, resolve_max_model_len
from kvrun.errors import ConfigError
from kvrun.models.config import ModelConfig
from kvrun.ops import reference as ops
from kvrun.scheduling import (
    NULL_BLOCK,
    BlockManager,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from kvrun.scheduling.capacity import blocks_needed

BS = 4  # tokens per block
W = 8  # the window: two blocks


def filled(bm: BlockManager, seq_id: str, tokens: Sequence[int]) -> list[int]:
    """A sequence whose ``tokens`` are all computed and committed."""
    table = bm.allocate(seq_id, len(tokens))
    assert table is not None
    bm.commit(seq_id, tokens, len(tokens))
    return table


# ---- block manager -------------------------------------------------------------------


def test_release_before_frees_whole_blocks_before_the_position_and_keeps_the_table() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    table = filled(bm, "a", list(range(18)))  # 5 blocks, the last one partly filled
    assert bm.num_free_blocks == 3
    # position 9 is in block 2: blocks 0 and 1 hold only earlier positions
    assert bm.release_before("a", 9) == 2
    assert bm.block_table("a") == [NULL_BLOCK, NULL_BLOCK, *table[2:]]
    assert bm.num_held_blocks("a") == 3 and bm.num_free_blocks == 5
    assert [bm.ref_count(b) for b in table[:2]] == [0, 0]
    assert bm.release_before("a", 9) == 0  # idempotent
    assert bm.release_before("a", 3) == 0  # never takes a release back
    # it grows on from where it was: the table stays positional
    grown = bm.allocate("a", 25, keep_from=12)
    assert grown is not None and len(grown) == 7
    assert grown[:3] == [NULL_BLOCK] * 3 and bm.num_held_blocks("a") == 4
    bm.free("a")
    assert bm.num_free_blocks == 8 and all(bm.ref_count(b) == 0 for b in range(8))


def test_released_cached_blocks_stay_hits_and_the_chain_goes_on() -> None:
    bm = BlockManager(10, BS, enable_prefix_caching=True)
    tokens = list(range(100, 116))  # 4 full blocks
    table = filled(bm, "a", tokens)
    assert bm.release_before("a", 8) == 2
    assert all(bm.is_cached(b) for b in table[:2])  # evictable, still in the cache
    # the sequence commits later blocks under the same chain after its release
    grown = bm.allocate("a", 24)
    assert grown is not None
    more = tokens + list(range(200, 208))
    bm.commit("a", more, 24)
    assert bm.is_cached(grown[5])
    # a second sequence with the same 24 tokens and one more hits all six blocks, the
    # released ones included
    hit = bm.find_prefix([*more, 7])
    assert hit.block_ids == (*table[:2], *grown[2:6])
    # ... and adopts only those it will read (keep_from = 24 - W + 1 = 17: blocks 4, 5)
    adopted = bm.allocate("b", 25, hit, keep_from=17)
    assert adopted is not None and adopted[:4] == [NULL_BLOCK] * 4
    assert adopted[4:6] == grown[4:6] and bm.ref_count(grown[4]) == 2
    assert bm.ref_count(table[0]) == 0 and bm.num_held_blocks("b") == 3
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 10


def test_a_hit_longer_than_the_free_pool_is_admitted_through_its_window() -> None:
    """Every block of a small cache holds one cached chain; a new request continuing it
    needs only its window's blocks and one new one, not the whole hit."""
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    tokens = list(range(16))
    filled(bm, "a", tokens)
    bm.free("a")  # all four blocks evictable and cached
    hit = bm.find_prefix([*tokens, 99])
    assert len(hit.block_ids) == 4
    assert bm.allocate("b", 17, hit) is None  # the whole hit and a new block: 5 > 4
    table = bm.allocate("b", 17, hit, keep_from=16 - W + 1)
    assert table is not None and bm.num_held_blocks("b") == 3  # blocks 2, 3 and a new one


def test_blocks_needed_bounds_a_windowed_sequence_by_one_step_span() -> None:
    assert blocks_needed(256, 16) == 16
    # W - 1 + chunk positions, wherever they fall among blocks
    assert blocks_needed(256, 16, sliding_window=16, max_chunk_tokens=16) == 3
    assert blocks_needed(256, 16, sliding_window=16, max_chunk_tokens=1) == 2
    assert blocks_needed(256, 16, sliding_window=4096, max_chunk_tokens=16) == 16  # never more
    assert blocks_needed(40, 16, sliding_window=16) == 3  # chunk = the whole sequence


# ---- scheduler -----------------------------------------------------------------------


def next_token(window: Sequence[int]) -> int:
    """The stand-in model: a pure function of the last W tokens and of how many there are."""
    return (sum(t * (i + 1) for i, t in enumerate(window)) * 31 + len(window)) % 1000


class WindowedPagedModel:
    """Writes each chunk's tokens into slots through its block table, then samples from
    the last W slots read back the same way (all writes of a step before any read)."""

    def __init__(self, num_blocks: int) -> None:
        self.slots: list[list[int | None]] = [[None] * BS for _ in range(num_blocks)]

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        for chunk in out.chunks:
            for j, token in enumerate(chunk.token_ids):
                pos = chunk.start_position + j
                self.slots[chunk.block_ids[pos // BS]][pos % BS] = token
        sampled = {}
        for chunk in out.chunks:
            if chunk.samples:
                end = chunk.start_position + len(chunk.token_ids)
                window = [self.slots[chunk.block_ids[p // BS]][p % BS] for p in range(end)[-W:]]
                assert None not in window, f"{chunk.request_id} reads an unwritten slot"
                sampled[chunk.request_id] = [next_token(window)]  # type: ignore[arg-type]
        return sampled


def reference(prompt: Sequence[int], max_tokens: int) -> list[int]:
    history, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(history[-W:])
        history.append(token)
        out.append(token)
    return out


def windowed_config(**overrides: object) -> SchedulerConfig:
    values: dict[str, object] = dict(
        max_num_seqs=4,
        max_num_batched_tokens=4,
        max_model_len=128,
        block_size=BS,
        num_blocks=16,
        sliding_window=W,
    )
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def check_windowed_invariants(sched: Scheduler, requests: Sequence[Request]) -> None:
    """Held blocks are bounded, counted once, and every entry a running request will
    still read is a block it holds; released entries are placeholders."""
    bm, cfg = sched.block_manager, sched.config
    assert cfg.sliding_window is not None
    running = [r for r in requests if r.status is RequestStatus.RUNNING]
    bound = blocks_needed(cfg.max_model_len, BS, cfg.sliding_window, cfg.max_num_batched_tokens)
    owners: Counter[int] = Counter()
    for r in running:
        first_read = max(0, r.num_computed_tokens - cfg.sliding_window + 1) // BS
        held = r.block_ids[first_read:]
        assert r.block_ids[: len(r.block_ids) - bm.num_held_blocks(r.request_id)] == [
            NULL_BLOCK
        ] * (len(r.block_ids) - bm.num_held_blocks(r.request_id))
        assert bm.num_held_blocks(r.request_id) <= bound
        assert len(held) <= bm.num_held_blocks(r.request_id)
        owners.update(r.block_ids[len(r.block_ids) - bm.num_held_blocks(r.request_id) :])
        for block in held:
            assert bm.ref_count(block) > 0
    for block in range(cfg.num_blocks):
        assert bm.ref_count(block) == owners[block]
    assert bm.num_used_blocks == len(owners)


def run(
    sched: Scheduler, prompts: Sequence[Sequence[int]], max_tokens: int
) -> tuple[list[list[int]], int]:
    """Every prompt to completion; the outputs and the most requests running at once."""
    model = WindowedPagedModel(sched.config.num_blocks)
    requests = [
        Request(f"r{i}", list(p), max_tokens=max_tokens, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    for r in requests:
        sched.add_request(r)
    most_running = 0
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        most_running = max(most_running, sched.num_running)
        sched.update(out, model.execute(out))
        check_windowed_invariants(sched, requests)
    assert not sched.has_unfinished_requests()
    return [r.output_token_ids for r in requests], most_running


def test_windowed_requests_run_together_in_a_cache_that_holds_no_full_sequence() -> None:
    """Four requests of 128 tokens (32 blocks each, far more than the 16 in the cache)
    run side by side without a preemption: each holds at most one step's span, the
    W - 1 + 4 positions of a 4-token chunk: 4 blocks."""
    prompts = [[i * 50 + j for j in range(10 + 3 * i)] for i in range(4)]
    with pytest.raises(ConfigError, match="needs 32"):
        windowed_config(sliding_window=None)  # without the window: refused
    sched = Scheduler(windowed_config())
    outputs, most_running = run(sched, prompts, max_tokens=100)
    assert outputs == [reference(p, 100) for p in prompts]
    assert most_running == 4
    assert sched.stats.num_preemptions_total == 0
    assert sched.block_manager.num_free_blocks == 16


@pytest.mark.parametrize("caching", [True, False])
def test_windowed_requests_under_pressure_preempt_recompute_and_hit_the_cache(
    caching: bool,
) -> None:
    """Seven blocks for four requests of up to 5 each: preemption and recompute in chunks, and
    (with caching) prefix hits through blocks released out of windows, all producing what
    a cacheless run does."""
    shared = list(range(500, 530))  # a 30-token prefix two prompts share
    prompts = [[*shared, 1, 2], [7] * 21, [*shared, 3], list(range(40, 47))]
    sched = Scheduler(
        windowed_config(num_blocks=7, max_num_batched_tokens=8, enable_prefix_caching=caching)
    )
    outputs, _ = run(sched, prompts, max_tokens=60)
    assert outputs == [reference(p, 60) for p in prompts]
    assert sched.stats.num_preemptions_total > 0
    assert (sched.stats.prefix_cache_hits > 0) is caching
    assert sched.block_manager.num_free_blocks == 7


def test_a_too_small_cache_is_refused_naming_the_window() -> None:
    # W - 1 + 8 = 15 positions touch at most 5 blocks of 4
    with pytest.raises(ConfigError, match=r"needs 5 \(a sliding window of 8 and steps of up to 8"):
        windowed_config(num_blocks=4, max_num_batched_tokens=8)
    windowed_config(num_blocks=5, max_num_batched_tokens=8)


# ---- the engine's choice -------------------------------------------------------------


def _model(model_type: str, architecture: str, **fields: Any) -> ModelConfig:
    hf = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **fields,
    }
    return ModelConfig.from_hf(hf, "test")


def test_mistral_is_served_to_full_length_and_releases_where_the_backend_windows() -> None:
    mistral = _model("mistral", "MistralForCausalLM", sliding_window=16)
    reference = ReferenceAttention(AttentionLayerSpec(4, 2, 16, 0.25))
    assert resolve_max_model_len(None, mistral, False, reference)[0] == 256
    assert released_window(mistral, reference) == 16
    # a backend that computes no window: global attention, exact only up to the window
    length, why = resolve_max_model_len(None, mistral, False, None)
    assert length == 16 and "sliding_window=16" in why


def test_windows_on_some_layers_release_nothing() -> None:
    reference = ReferenceAttention(AttentionLayerSpec(4, 2, 16, 0.25))
    # Qwen2's opt-in window covers the layers from max_window_layers on: kvrun attends
    # globally up to the window
    qwen = _model("qwen2", "Qwen2ForCausalLM", sliding_window=16, use_sliding_window=True)
    assert resolve_max_model_len(None, qwen, False, reference)[0] == 16
    assert released_window(qwen, reference) is None
    # Gemma 2 interleaves global layers: windows computed, nothing released
    gemma = _model(
        "gemma2",
        "Gemma2ForCausalLM",
        sliding_window=16,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    assert gemma.layer_windows == (16, None, 16, None)
    assert resolve_max_model_len(None, gemma, False, reference)[0] == 256
    assert released_window(gemma, reference) is None


# ---- the attention ---------------------------------------------------------------------


def test_windowed_attention_never_reads_entries_before_the_window() -> None:
    """Released entries point at NULL_BLOCK, which another request may hold: here a block
    of NaN. A windowed query must give the same output as with its real blocks there."""
    g = torch.Generator().manual_seed(0)
    num_blocks, heads, kv_heads, dim = 12, 4, 2, 16
    key_cache = torch.randn((num_blocks, BS, kv_heads, dim), generator=g)
    value_cache = torch.randn((num_blocks, BS, kv_heads, dim), generator=g)
    key_cache[NULL_BLOCK] = value_cache[NULL_BLOCK] = float("nan")
    # a 3-token chunk ending at 20 (first key seen: 17 - W + 1 = 10, block 2) and a decode
    # at 13 (first key 5, block 1)
    seq_lens, query_lens = [20, 13], [3, 1]
    real = [[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]]
    released = [[NULL_BLOCK, NULL_BLOCK, 7, 9, 11], [NULL_BLOCK, 4, 6, 8, 10]]
    query = torch.randn((4, heads, dim), generator=g)

    def attend(tables: list[list[int]], window: int | None) -> torch.Tensor:
        return ops.paged_attention(
            query,
            key_cache,
            value_cache,
            torch.tensor(tables, dtype=torch.int32),
            seq_lens,
            query_lens,
            dim**-0.5,
            sliding_window=window,
        )

    want = attend(real, W)
    got = attend(released, W)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the window matters here: global attention over the real blocks differs
    assert not torch.allclose(attend(real, None), want)
