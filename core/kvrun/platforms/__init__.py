"""The platform contract that hardware plugins implement."""

from kvrun.platforms.base import (
    DecodeGraphRunner,
    KVCachePlan,
    KVCacheRequest,
    ModelExecutor,
    Platform,
    Unavailable,
)

__all__ = [
    "DecodeGraphRunner",
    "KVCachePlan",
    "KVCacheRequest",
    "ModelExecutor",
    "Platform",
    "Unavailable",
]
