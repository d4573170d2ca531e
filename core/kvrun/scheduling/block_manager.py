"""Paged KV-cache block accounting with prefix caching over chained content hashes."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvrun.scheduling.free_blocks import FifoFreeBlocks, FreeBlockPolicy

__all__ = [
    "NULL_BLOCK",
    "ROOT_BLOCK_HASH",
    "BlockManager",
    "PrefixHit",
    "hash_block",
    "root_hash",
]

# The parent digest of a sequence's first block.
ROOT_BLOCK_HASH = bytes(32)

# What a block table holds in place of a block released out of a sliding window
# (BlockManager.release_before). Block 0 is an ordinary block that another sequence may
# hold: the entry only keeps the table positional (entry i covers tokens [i * bs, (i + 1)
# * bs)) and stays in bounds for a kernel that indexes with it, as table padding does;
# attention with the window never reads it (kvrun.ops.reference.paged_attention gathers
# from the window's first block).
NULL_BLOCK = 0


def root_hash(salt: bytes) -> bytes:
    """The parent digest of the first block of a sequence with this cache salt (a LoRA
    adapter's identity): ROOT_BLOCK_HASH for none, else a digest no chain can reach, so
    sequences with different salts never share a block."""
    if not salt:
        return ROOT_BLOCK_HASH
    return hashlib.sha256(b"kvrun-cache-salt\0" + salt).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256(parent digest || token ids as little-endian int64): the digest of a whole chain.

    Chaining makes a block's digest depend on every token before it, so equal digests
    mean equal prefixes (up to a sha256 collision), not just equal block contents.
    """
    digest = hashlib.sha256(parent)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks that hold the start of a token sequence, found by ``find_prefix``.

    Valid only until the block manager next changes; pass it straight to ``allocate``.
    """

    block_ids: tuple[int, ...]  # [n] cached blocks holding tokens [0, n * block_size)
    block_hashes: tuple[bytes, ...]  # [n] their chain digests
    num_tokens: int  # n * block_size: tokens that need no computation
    num_query_tokens: int  # length of the sequence that was looked up (for metrics)


@dataclass
class _SeqBlocks:
    block_ids: list[int]  # the block table
    block_hashes: list[bytes] = field(default_factory=list)  # digests of its full computed blocks
    # Leading table entries released out of a sliding window: NULL_BLOCK placeholders that
    # hold no block (their digests stay in block_hashes, so the chain goes on).
    num_released: int = 0


class BlockManager:
    """Fixed-size KV blocks, per-sequence block tables, reference counts, prefix cache.

    Invariants:
    - Every block is in exactly one of three states: *used* (reference count > 0, in
      one or more block tables), *clean free* (count 0, no digest, in the clean queue)
      or *evictable* (count 0, has a digest, in the LRU queue).
      ``num_free_blocks + num_used_blocks == num_blocks``; free blocks are clean plus
      evictable, so a cached block with count 0 stays reusable until it is evicted.
    - A block's reference count equals the number of block tables that hold it. Only
      cached (digested) blocks are ever shared, and only a sequence's leading blocks.
    - The cache maps a chain digest (see :func:`hash_block`) to one block, and a block
      carries a digest iff the cache maps that digest to it. Only blocks whose
      ``block_size`` tokens have all been computed are registered (``commit``), so a hit
      never exposes K/V that have not been written.
    - A prefix hit covers whole blocks and never the whole sequence: at most
      ``(len - 1) // block_size`` blocks, so the last token is always computed and the
      model yields logits for it.
    - Allocation takes clean blocks first, in the order of the free-block policy (FIFO
      by default; see :mod:`kvrun.scheduling.free_blocks`), and evicts only when none is
      left, the least recently freed evictable block first. ``free`` releases a table
      tail first, so a sequence's tail is evicted before its head, which keeps shared
      heads longest.
    - With prefix caching disabled nothing is hashed, registered or shared.
    - Prefix-cache counters are in tokens and count each admitted lookup once:
      ``prefix_cache_queries`` adds the looked-up length, ``prefix_cache_hits`` the hit.
    - Block ids are 0..num_blocks-1; 0 is an ordinary block.
    - Sliding windows (``release_before``): when every attention layer of the model sees
      only the last W positions, a sequence's leading blocks that no later query can see
      are released while it runs, so it holds about ``W / block_size`` blocks however
      long it grows. Released entries stay in its table as ``NULL_BLOCK`` placeholders
      (a released prefix of the table, never a hole in the middle), hold no reference,
      and are skipped by ``free``; a released cached block stays in the prefix cache
      (evictable), so the chain of digests of the sequence and of every other sequence
      stays valid. Only a model whose *every* layer is windowed may release blocks:
      layers share one block table, and a global layer (Gemma's) reads every position.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        free_block_policy: FreeBlockPolicy | None = None,  # None = FIFO, the core default
    ) -> None:
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        self._cache: dict[bytes, int] = {}
        self.free_block_policy = free_block_policy or FifoFreeBlocks()
        self._clean = self.free_block_policy.new_pool(num_blocks)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self._seqs: dict[str, _SeqBlocks] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- accounting -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: clean ones plus evictable cached ones."""
        return len(self._clean) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, 0..1."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._block_hashes[block_id] is not None

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order allocations will take them (clean, then LRU evictable)."""
        return [*self._clean, *self._evictable]

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of a sequence's block table; empty when it holds no blocks."""
        seq = self._seqs.get(seq_id)
        return list(seq.block_ids) if seq is not None else []

    def num_held_blocks(self, seq_id: str) -> int:
        """Blocks a sequence holds now: its table less the entries released out of its window."""
        seq = self._seqs.get(seq_id)
        return len(seq.block_ids) - seq.num_released if seq is not None else 0

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------

    def find_prefix(self, token_ids: Sequence[int], salt: bytes = b"") -> PrefixHit:
        """The longest cached run of whole leading blocks, always short of the last token,
        among blocks committed with the same ``salt``."""
        if not self.enable_prefix_caching:
            return PrefixHit((), (), 0, len(token_ids))
        bs = self.block_size
        block_ids: list[int] = []
        hashes: list[bytes] = []
        parent = root_hash(salt)
        for i in range((len(token_ids) - 1) // bs):
            digest = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._cache.get(digest)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(digest)
            parent = digest
        return PrefixHit(tuple(block_ids), tuple(hashes), len(block_ids) * bs, len(token_ids))

    def commit(
        self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int, salt: bytes = b""
    ) -> None:
        """Register the sequence's blocks that ``num_computed_tokens`` computed tokens fill.

        ``token_ids`` is the sequence's tokens (at least ``num_computed_tokens`` of them);
        ``salt`` the one its prefix was looked up with.
        A block whose content another block already caches (a twin computed in the same
        step) stays unregistered and is released clean.
        """
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        bs = self.block_size
        num_full = num_computed_tokens // bs
        assert num_full <= len(seq.block_ids) and num_computed_tokens <= len(token_ids)
        parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(salt)
        for i in range(len(seq.block_hashes), num_full):
            assert i >= seq.num_released, f"block {i} of {seq_id!r} released uncommitted"
            digest = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(digest)
            parent = digest
            if digest in self._cache:
                continue
            block_id = seq.block_ids[i]
            assert self._block_hashes[block_id] is None, f"block {block_id} already cached"
            self._cache[digest] = block_id
            self._block_hashes[block_id] = digest

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        for block_id in self._evictable:
            self._block_hashes[block_id] = None
            self._clean.push(block_id)
        self._evictable.clear()
        self._cache.clear()
        return True

    # ---- allocation -------------------------------------------------------------------

    def allocate(
        self,
        seq_id: str,
        num_tokens: int,
        prefix: PrefixHit | None = None,
        keep_from: int = 0,
    ) -> list[int] | None:
        """Grow (or create) ``seq_id``'s table to hold ``num_tokens`` tokens.

        ``prefix`` (a new sequence only) adopts those cached blocks first. Returns a copy
        of the whole table, or None, changing nothing else, when too few blocks are free.
        ``keep_from`` (a model whose every layer has a sliding window): the first
        position any query still to come can see; blocks wholly before it are released
        first (``release_before``), and a prefix hit's blocks before it are not adopted
        (their entries are ``NULL_BLOCK`` from the start), so they need no free block.
        """
        seq = self._seqs.get(seq_id)
        hit = prefix if prefix is not None else PrefixHit((), (), 0, 0)
        assert seq is None or prefix is None, f"prefix given for existing sequence {seq_id!r}"
        assert num_tokens > hit.num_tokens, (num_tokens, hit.num_tokens)
        if seq is not None:
            self.release_before(seq_id, keep_from)
        skip = min(max(0, keep_from) // self.block_size, len(hit.block_ids))
        adopted = hit.block_ids[skip:]
        have = len(seq.block_ids) if seq is not None else len(hit.block_ids)
        num_new = max(0, self.num_blocks_needed(num_tokens) - have)
        # Reviving an evictable hit block takes it out of the free pool too.
        num_revived = sum(1 for b in adopted if self._ref_counts[b] == 0)
        if num_new + num_revived > self.num_free_blocks:
            return None
        if seq is None:
            for block_id, digest in zip(adopted, hit.block_hashes[skip:], strict=True):
                assert self._block_hashes[block_id] == digest, f"stale prefix hit {block_id}"
                if self._ref_counts[block_id] == 0:
                    del self._evictable[block_id]
                self._ref_counts[block_id] += 1
            table = [NULL_BLOCK] * skip + list(adopted)
            seq = _SeqBlocks(table, list(hit.block_hashes), num_released=skip)
            self._seqs[seq_id] = seq
            if self.enable_prefix_caching and prefix is not None:
                self.prefix_cache_queries += hit.num_query_tokens
                self.prefix_cache_hits += hit.num_tokens
        for _ in range(num_new):
            seq.block_ids.append(self._take_free_block())
        return list(seq.block_ids)

    def release_before(self, seq_id: str, position: int) -> int:
        """Release the sequence's blocks that hold only tokens before ``position``; returns
        how many were released now.

        For a model whose every attention layer has a sliding window: ``position`` is the
        first one any query still to come can see (``num_computed_tokens - W + 1``). The
        released entries become ``NULL_BLOCK`` placeholders; the blocks go back to the
        pool in table order (a cached one stays in the prefix cache until evicted, the
        oldest first). With prefix caching every released block was committed first, as
        blocks wholly before the computed tokens are.
        """
        seq = self._seqs[seq_id]
        end = min(max(0, position) // self.block_size, len(seq.block_ids))
        released = 0
        for i in range(seq.num_released, end):
            self._unref(seq.block_ids[i])
            seq.block_ids[i] = NULL_BLOCK
            released += 1
        seq.num_released = max(seq.num_released, end)
        return released

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks, tail first; cached ones stay reusable until evicted."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for block_id in reversed(seq.block_ids[seq.num_released :]):
            self._unref(block_id)

    def _unref(self, block_id: int) -> None:
        """Drop one table's reference; at zero the block becomes free (evictable if cached)."""
        self._ref_counts[block_id] -= 1
        assert self._ref_counts[block_id] >= 0, f"block {block_id} freed twice"
        if self._ref_counts[block_id] == 0:
            if self._block_hashes[block_id] is None:
                self._clean.push(block_id)
            else:
                self._evictable[block_id] = None

    def _take_free_block(self) -> int:
        if len(self._clean):
            block_id = self._clean.pop()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            digest = self._block_hashes[block_id]
            assert digest is not None
            del self._cache[digest]
            self._block_hashes[block_id] = None
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id
