"""Device-neutral scheduling: requests, the KV block manager and the continuous batcher.

Nothing here imports torch: the scheduler decides which tokens each request computes
and which KV blocks hold them; the model runner turns that into tensors.
"""

from __future__ import annotations

from kvrun.scheduling.block_manager import NULL_BLOCK, BlockManager, PrefixHit, hash_block
from kvrun.scheduling.config import SchedulerConfig
from kvrun.scheduling.free_blocks import (
    FifoFreeBlocks,
    FreeBlockPolicy,
    FreeBlockPool,
    LowestIdFirst,
    MostRecentlyFreedFirst,
)
from kvrun.scheduling.output import ScheduledChunk, SchedulerOutput, SchedulerStats
from kvrun.scheduling.request import Request, RequestStatus
from kvrun.scheduling.scheduler import Scheduler, check_stop

__all__ = [
    "NULL_BLOCK",
    "BlockManager",
    "FifoFreeBlocks",
    "FreeBlockPolicy",
    "FreeBlockPool",
    "LowestIdFirst",
    "MostRecentlyFreedFirst",
    "PrefixHit",
    "Request",
    "RequestStatus",
    "ScheduledChunk",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "check_stop",
    "hash_block",
]
