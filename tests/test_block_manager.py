"""BlockManager: exact block ids, reference counts, prefix hits and eviction order."""

from __future__ import annotations

import hashlib
import struct

from kvrun.scheduling.block_manager import ROOT_BLOCK_HASH, BlockManager, hash_block

BS = 4  # tokens per block in every test here


def make(num_blocks: int = 8, caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=caching)


def admit(
    bm: BlockManager, seq_id: str, tokens: list[int], computed: int | None = None
) -> list[int]:
    """Look the prefix up, allocate all tokens, and register what ``computed`` tokens fill."""
    table = bm.allocate(seq_id, len(tokens), bm.find_prefix(tokens))
    assert table is not None
    bm.commit(seq_id, tokens, len(tokens) if computed is None else computed)
    return table


def test_hash_block_is_sha256_over_parent_and_int64_tokens() -> None:
    expected = hashlib.sha256(bytes(32) + struct.pack("<4q", 1, 2, 3, 4)).digest()
    assert bytes(32) == ROOT_BLOCK_HASH
    assert hash_block(ROOT_BLOCK_HASH, [1, 2, 3, 4]) == expected
    # The same block content under another parent is another digest.
    parent = hash_block(ROOT_BLOCK_HASH, [9, 9, 9, 9])
    assert hash_block(parent, [1, 2, 3, 4]) != expected


def test_allocation_grows_tables_and_counts_blocks() -> None:
    bm = make(caching=False)
    assert bm.allocate("a", 10) == [0, 1, 2]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (5, 3, 3 / 8)
    assert bm.allocate("a", 12) == [0, 1, 2]  # still fits in 3 blocks
    assert bm.allocate("a", 13) == [0, 1, 2, 3]
    assert bm.allocate("b", 16) == [4, 5, 6, 7]
    assert bm.num_free_blocks == 0
    # Too few free blocks: None, and nothing changes.
    assert bm.allocate("c", 1) is None
    assert bm.allocate("a", 17) is None
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.block_table("c") == []
    assert [bm.ref_count(b) for b in range(8)] == [1] * 8
    bm.free("a")
    # Freed tail first, so the tail is handed out first.
    assert bm.free_block_ids() == [3, 2, 1, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (4, 4, 0.5)
    bm.free("a")  # freeing an unknown sequence is a no-op
    assert bm.num_free_blocks == 4
    assert bm.allocate("c", 5) == [3, 2]


def test_identical_prompts_share_full_blocks_with_refcounts() -> None:
    bm = make()
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    assert admit(bm, "a", prompt) == [0, 1, 2]
    assert [bm.is_cached(b) for b in (0, 1, 2)] == [True, True, False]
    hit = bm.find_prefix(prompt)
    assert (hit.block_ids, hit.num_tokens, hit.num_query_tokens) == ((0, 1), 8, 10)
    assert bm.allocate("b", 10, hit) == [0, 1, 3]
    assert [bm.ref_count(b) for b in range(5)] == [2, 2, 1, 1, 0]
    assert bm.num_used_blocks == 4
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 8)
    bm.free("a")
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    bm.free("b")
    # Clean blocks first (FIFO), then the cached ones in LRU order, tail before head.
    assert bm.free_block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]
    assert bm.num_used_blocks == 0


def test_output_tokens_fill_blocks_that_later_prompts_hit() -> None:
    bm = make()
    tokens = [1, 2, 3, 4, 5, 6]
    assert bm.allocate("a", 6, bm.find_prefix(tokens)) == [0, 1]
    bm.commit("a", tokens, 6)
    assert [bm.is_cached(b) for b in (0, 1)] == [True, False]
    tokens += [7, 8]  # two generated tokens complete block 1 once computed
    bm.commit("a", tokens, 7)
    assert bm.is_cached(1) is False
    bm.commit("a", tokens, 8)
    assert bm.is_cached(1) is True
    hit = bm.find_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (hit.block_ids, hit.num_tokens) == ((0, 1), 8)


def test_hit_never_covers_the_whole_sequence() -> None:
    bm = make()
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]  # exactly 2 blocks
    admit(bm, "a", prompt)
    assert [bm.is_cached(b) for b in (0, 1)] == [True, True]
    # The last token must be computed for logits, so only 1 block of 8 tokens hits.
    assert bm.find_prefix(prompt).block_ids == (0,)
    assert bm.find_prefix([*prompt, 13]).block_ids == (0, 1)
    assert bm.find_prefix(prompt[:4]).block_ids == ()
    assert bm.find_prefix(prompt[:5]).block_ids == (0,)


def test_same_block_under_another_parent_does_not_hit() -> None:
    bm = make()
    admit(bm, "a", [1, 1, 1, 1, 2, 2, 2, 2, 0])  # blocks 0 (1s) and 1 (2s) cached
    admit(bm, "c", [3, 3, 3, 3, 0])  # block 3 (3s) cached; block 4 holds the tail
    assert bm.block_table("c") == [3, 4]
    # [3s][2s]: the 2s block is cached only after the 1s block, so the hit stops at [3s].
    hit = bm.find_prefix([3, 3, 3, 3, 2, 2, 2, 2, 0])
    assert hit.block_ids == (3,)
    assert bm.find_prefix([2, 2, 2, 2, 0]).block_ids == ()
    assert bm.find_prefix([1, 1, 1, 1, 2, 2, 2, 2, 0]).block_ids == (0, 1)


def test_lru_eviction_order_is_exact() -> None:
    bm = make(num_blocks=6)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    b = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert admit(bm, "a", a, computed=8) == [0, 1, 2]
    assert admit(bm, "b", b, computed=8) == [3, 4, 5]
    bm.free("a")
    bm.free("b")
    assert bm.free_block_ids() == [2, 5, 1, 0, 4, 3]
    # A new 13-token sequence takes the two clean blocks, then evicts a's tail, then head.
    assert bm.allocate("c", 13, bm.find_prefix(list(range(50, 63)))) == [2, 5, 1, 0]
    assert [bm.is_cached(x) for x in range(6)] == [False, False, False, True, True, False]
    assert bm.find_prefix(a).block_ids == ()
    assert bm.find_prefix(b).block_ids == (3, 4)
    assert bm.free_block_ids() == [4, 3]


def test_a_hit_revives_evictable_blocks_and_counts_them_against_free_space() -> None:
    bm = make(num_blocks=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert admit(bm, "a", a, computed=8) == [0, 1, 2]
    bm.free("a")
    assert bm.free_block_ids() == [3, 2, 1, 0]
    longer = [*a[:8], 20, 21, 22, 23, 24, 25, 26, 27, 28]  # 17 tokens: 5 blocks, 2 hit
    assert bm.allocate("b", 17, bm.find_prefix(longer)) is None
    assert bm.free_block_ids() == [3, 2, 1, 0]
    same = [*a[:8], 20, 21, 22, 23, 24, 25, 26, 27]  # 16 tokens: 4 blocks, 2 hit
    hit = bm.find_prefix(same)
    assert hit.block_ids == (0, 1)
    assert bm.allocate("b", 16, hit) == [0, 1, 3, 2]
    assert bm.num_free_blocks == 0
    assert [bm.ref_count(x) for x in range(4)] == [1, 1, 1, 1]
    # Only the admitted lookup counted: 16 queried tokens, 8 hit.
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (9 + 16, 8)


def test_twins_computed_in_the_same_step_register_once() -> None:
    bm = make()
    prompt = list(range(9))
    assert bm.allocate("a", 9, bm.find_prefix(prompt)) == [0, 1, 2]
    assert bm.allocate("b", 9, bm.find_prefix(prompt)) == [3, 4, 5]
    bm.commit("a", prompt, 9)
    bm.commit("b", prompt, 9)
    assert [bm.is_cached(x) for x in range(6)] == [True, True, False, False, False, False]
    bm.free("b")
    bm.free("a")
    # b's duplicates were never cached, so they are clean and handed out before a's.
    assert bm.free_block_ids() == [6, 7, 5, 4, 3, 2, 1, 0]
    assert bm.find_prefix(prompt).block_ids == (0, 1)


def test_reset_prefix_cache_only_when_nothing_is_in_use() -> None:
    bm = make(num_blocks=4)
    admit(bm, "a", [1, 2, 3, 4, 5])
    assert bm.reset_prefix_cache() is False
    assert bm.is_cached(0) is True
    bm.free("a")
    assert bm.free_block_ids() == [2, 3, 1, 0]
    assert bm.reset_prefix_cache() is True
    assert [bm.is_cached(x) for x in range(4)] == [False] * 4
    assert bm.find_prefix([1, 2, 3, 4, 5]).block_ids == ()
    assert bm.free_block_ids() == [2, 3, 1, 0]
    assert bm.num_free_blocks == 4


def test_disabled_prefix_caching_hashes_and_shares_nothing() -> None:
    bm = make(caching=False)
    prompt = list(range(9))
    assert admit(bm, "a", prompt) == [0, 1, 2]
    hit = bm.find_prefix(prompt)
    assert (hit.block_ids, hit.num_tokens) == ((), 0)
    assert bm.allocate("b", 9, hit) == [3, 4, 5]
    assert [bm.is_cached(x) for x in range(8)] == [False] * 8
    assert [bm.ref_count(x) for x in range(6)] == [1] * 6
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.free("a")
    assert bm.free_block_ids() == [6, 7, 2, 1, 0]
