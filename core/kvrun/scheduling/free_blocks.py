"""Free-block policies: the order in which the block manager hands out clean free blocks.

A platform may need a particular order. Gaudi's contiguous paged attention
(``VLLM_CONTIGUOUS_PA``) reads the cache as one range ``[0, max used block]``, so it
wants the lowest free id first to keep the used set compact; a CPU wants the block
freed last, whose memory is already paged in; the core default is FIFO.
The policy is chosen by :meth:`kvrun.platforms.Platform.free_block_policy` and passed to
the :class:`~kvrun.scheduling.block_manager.BlockManager`. Nothing here imports torch.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

__all__ = [
    "FifoFreeBlocks",
    "FreeBlockPolicy",
    "FreeBlockPool",
    "LowestIdFirst",
    "MostRecentlyFreedFirst",
]


class FreeBlockPool(ABC):
    """The clean free blocks of one block manager (not the evictable cached ones).

    Invariants an implementation keeps:
    - It holds each block id at most once; ``push`` is only called with an id it does not
      hold, ``pop`` only when it is not empty.
    - ``pop`` returns and removes the block the policy hands out next, and iterating
      yields the held ids in exactly the order successive ``pop`` calls would return them
      (with no ``push`` in between); iterating changes nothing.
    - The order depends only on the sequence of ``push``/``pop`` calls, never on time or
      randomness, so scheduling stays reproducible.
    """

    @abstractmethod
    def push(self, block_id: int) -> None:
        """Return a block to the pool."""

    @abstractmethod
    def pop(self) -> int:
        """Take the next block out of the pool."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[int]: ...


class FreeBlockPolicy(ABC):
    """Makes the free pool of a new block manager. Stateless, so one may serve many."""

    name: str  # for logs and error messages

    @abstractmethod
    def new_pool(self, num_blocks: int) -> FreeBlockPool:
        """A pool holding every block id ``0..num_blocks-1``."""


class _FifoPool(FreeBlockPool):
    def __init__(self, num_blocks: int) -> None:
        self._queue: deque[int] = deque(range(num_blocks))

    def push(self, block_id: int) -> None:
        self._queue.append(block_id)

    def pop(self) -> int:
        return self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[int]:
        return iter(self._queue)


class FifoFreeBlocks(FreeBlockPolicy):
    """The core default: ids ascending at start, then the first freed is the first reused."""

    name = "fifo"

    def new_pool(self, num_blocks: int) -> FreeBlockPool:
        return _FifoPool(num_blocks)


class _LowestIdPool(FreeBlockPool):
    def __init__(self, num_blocks: int) -> None:
        self._heap = list(range(num_blocks))  # ascending, so already a heap

    def push(self, block_id: int) -> None:
        heapq.heappush(self._heap, block_id)

    def pop(self) -> int:
        return heapq.heappop(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._heap))


class LowestIdFirst(FreeBlockPolicy):
    """Always hand out the lowest free id, so used blocks stay packed near 0.

    With this policy and no prefix caching, the highest used id is below the number of
    blocks that were ever in use at once, which bounds a contiguous cache range.
    """

    name = "lowest-id-first"

    def new_pool(self, num_blocks: int) -> FreeBlockPool:
        return _LowestIdPool(num_blocks)


class _StackPool(FreeBlockPool):
    def __init__(self, num_blocks: int) -> None:
        self._stack = list(range(num_blocks - 1, -1, -1))  # pops 0 first

    def push(self, block_id: int) -> None:
        self._stack.append(block_id)

    def pop(self) -> int:
        return self._stack.pop()

    def __len__(self) -> int:
        return len(self._stack)

    def __iter__(self) -> Iterator[int]:
        return reversed(self._stack)


class MostRecentlyFreedFirst(FreeBlockPolicy):
    """Hand out the clean block freed last (ids ascending at start).

    For a cache in host memory: that block's pages were written recently, so they are
    mapped and likely still in the CPU caches, where a never-used block first costs a
    page fault per page (NOTES.md: first touch of the KV cache). Only clean
    blocks are ordered: prefix-cached blocks keep the block manager's LRU eviction.
    """

    name = "most-recently-freed-first"

    def new_pool(self, num_blocks: int) -> FreeBlockPool:
        return _StackPool(num_blocks)
