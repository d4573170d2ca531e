"""Free-block policies: the default FIFO order is unchanged; lowest-id-first keeps ids compact."""

from __future__ import annotations

import random

import pytest
import torch

from kvrun.config import EngineConfig
from kvrun.envs import read_env
from kvrun.platforms import Platform
from kvrun.platforms.base import KVCacheRequest
from kvrun.scheduling import (
    BlockManager,
    FifoFreeBlocks,
    FreeBlockPolicy,
    LowestIdFirst,
    MostRecentlyFreedFirst,
    Request,
    Scheduler,
    SchedulerConfig,
)

BS = 4  # tokens per block in every test here


def make(policy: FreeBlockPolicy | None, num_blocks: int = 8) -> BlockManager:
    return BlockManager(num_blocks, BS, enable_prefix_caching=False, free_block_policy=policy)


def churn(bm: BlockManager) -> dict[str, list[int]]:
    """a, b, c take 2, 3, 1 blocks; a and c leave; d asks for 3 blocks, e for 1."""
    tables = {}
    for seq, tokens in (("a", 8), ("b", 12), ("c", 4)):
        table = bm.allocate(seq, tokens)
        assert table is not None
        tables[seq] = table
    bm.free("a")
    bm.free("c")
    for seq, tokens in (("d", 12), ("e", 4)):
        table = bm.allocate(seq, tokens)
        assert table is not None
        tables[seq] = table
    return tables


@pytest.mark.parametrize("policy", [None, FifoFreeBlocks()])
def test_fifo_is_the_default_and_reuses_the_first_freed_block_last(
    policy: FreeBlockPolicy | None,
) -> None:
    bm = make(policy)
    assert bm.free_block_policy.name == "fifo"
    tables = churn(bm)
    assert tables == {"a": [0, 1], "b": [2, 3, 4], "c": [5], "d": [6, 7, 1], "e": [0]}
    # Freed tail first (a: 1 then 0), appended behind the never-used ones.
    assert bm.free_block_ids() == [5]


def test_lowest_id_first_fills_the_holes_before_higher_ids() -> None:
    bm = make(LowestIdFirst())
    assert bm.free_block_policy.name == "lowest-id-first"
    bm.allocate("a", 8)
    bm.allocate("b", 12)
    bm.allocate("c", 4)
    bm.free("a")
    bm.free("c")
    assert bm.free_block_ids() == [0, 1, 5, 6, 7]  # the order the next allocations take
    assert bm.allocate("d", 12) == [0, 1, 5]
    assert bm.allocate("e", 4) == [6]
    assert bm.free_block_ids() == [7]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (1, 7)


def test_most_recently_freed_first_reuses_the_last_freed_block_first() -> None:
    bm = make(MostRecentlyFreedFirst())
    assert bm.free_block_policy.name == "most-recently-freed-first"
    assert bm.free_block_ids() == list(range(8))  # ids ascending at start
    tables = churn(bm)
    # a frees 1 then 0 (tail first), then c frees 5: 5 is handed out first, then 0, 1.
    assert tables == {"a": [0, 1], "b": [2, 3, 4], "c": [5], "d": [5, 0, 1], "e": [6]}
    assert bm.free_block_ids() == [7]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (1, 7)


def test_most_recently_freed_first_pops_in_the_order_it_iterates() -> None:
    pool = MostRecentlyFreedFirst().new_pool(5)
    for block in (pool.pop(), pool.pop()):
        pool.push(block)
    order = list(pool)
    assert order == [1, 0, 2, 3, 4]
    assert [pool.pop() for _ in range(5)] == order


def test_lowest_id_first_keeps_the_highest_used_id_below_the_peak_block_count() -> None:
    # The bound contiguous paged attention relies on: the range [0, max id] it reads is
    # never longer than the most blocks ever in use at once.
    rng = random.Random(7)
    bm = make(LowestIdFirst(), num_blocks=64)
    live: dict[str, int] = {}
    peak = max_id = 0
    for n in range(2000):
        if live and (rng.random() < 0.4 or bm.num_free_blocks < 4):
            victim = rng.choice(sorted(live))
            bm.free(victim)
            del live[victim]
        else:
            seq = f"s{n}"
            table = bm.allocate(seq, rng.randint(1, 4 * BS))
            assert table is not None
            live[seq] = len(table)
            max_id = max(max_id, *table)
        for seq in list(live):
            if rng.random() < 0.3:  # a decode that may open a new block
                grown = bm.allocate(seq, live[seq] * BS + 1)
                if grown is not None:
                    live[seq] = len(grown)
                    max_id = max(max_id, grown[-1])
        peak = max(peak, bm.num_used_blocks)
        used = {b for seq in live for b in bm.block_table(seq)}
        assert len(used) == bm.num_used_blocks
        assert used.isdisjoint(bm.free_block_ids())
        assert max_id < peak
    assert peak > 8  # the run did exercise reuse


def test_a_policy_changes_block_ids_but_not_the_schedule() -> None:
    cfg = SchedulerConfig(
        max_num_seqs=3,
        max_num_batched_tokens=16,
        max_model_len=32,
        block_size=BS,
        num_blocks=12,
        enable_prefix_caching=False,
    )
    runs = {}
    for policy in (None, LowestIdFirst()):
        sched = Scheduler(cfg, free_block_policy=policy)
        for i, (prompt, max_tokens) in enumerate([(5, 2), (9, 6), (3, 7)]):
            sched.add_request(Request(f"r{i}", list(range(1, prompt + 1)), max_tokens))
        steps = []
        while sched.has_unfinished_requests():
            out = sched.schedule()
            steps.append([(c.request_id, c.token_ids, c.block_ids) for c in out.chunks])
            sched.update(out, {c.request_id: [100 + len(steps)] for c in out.chunks if c.samples})
        runs[policy is None] = steps
    fifo, lowest = runs[True], runs[False]
    # Same requests, same tokens each step; only the ids differ once r0's blocks return.
    assert [[(r, t) for r, t, _ in s] for s in fifo] == [[(r, t) for r, t, _ in s] for s in lowest]
    # r0 finishes after step 1 and frees blocks 1, 0 (tail first); FIFO queues them
    # behind the never-used 6..11, lowest-id-first hands them out next.
    assert fifo[4] == [("r1", [104], [2, 3, 4, 7]), ("r2", [104], [5, 6])]
    assert lowest[4] == [("r1", [104], [2, 3, 4, 1]), ("r2", [104], [5, 0])]
    # r1 finishes after step 5; r2's third block is the next free one.
    assert fifo[-1] == [("r2", [107], [5, 6, 8])]
    assert lowest[-1] == [("r2", [107], [5, 0, 1])]


class _PolicyFreePlatform(Platform):
    """A platform that states only what the contract requires."""

    name = "policy-free"
    device_type = "meta"
    dist_backend = "gloo"

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        return 0, "unused"


def test_the_platform_default_is_the_core_policy() -> None:
    config = EngineConfig(
        model_source="m",
        model_name="m",
        architecture="LlamaForCausalLM",
        dtype=torch.float32,
        max_model_len=32,
        vocab_size=100,
        block_size=BS,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=0,
        platform_name="policy-free",
        attention_backend="REFERENCE",
    )
    assert _PolicyFreePlatform(read_env({})).free_block_policy(config) is None
