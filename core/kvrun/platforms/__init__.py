"""The platform contract that hardware plugins implement."""

from kvrun.platforms.base import (
    DecodeGraphRunner,
    KVCachePlan,
    KVCacheRequest,
    ModelExecutor,
    Platform,
    Unavailable,
    plan_exact_kv_blocks,
)

__all__ = [
    "DecodeGraphRunner",
    "KVCachePlan",
    "KVCacheRequest",
    "ModelExecutor",
    "Platform",
    "Unavailable",
    "plan_exact_kv_blocks",
]
