"""The platform contract that hardware plugins implement."""

from kvrun.platforms.base import KVCachePlan, KVCacheRequest, ModelExecutor, Platform, Unavailable

__all__ = ["KVCachePlan", "KVCacheRequest", "ModelExecutor", "Platform", "Unavailable"]
