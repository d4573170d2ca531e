"""The CPU platform."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.platforms import KVCacheRequest, Platform

__all__ = ["CpuPlatform"]

GiB = 1 << 30
# VLLM_CPU_KVCACHE_SPACE of 0 (its default) means this many GiB, as in vLLM.
DEFAULT_KVCACHE_GIB = 4


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = 0
    # float32 first: on AVX2 CPUs without AVX512-BF16, bf16 matmuls run 10-50x slower.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        gib = self.env.VLLM_CPU_KVCACHE_SPACE
        if gib == 0:
            return DEFAULT_KVCACHE_GIB * GiB, (
                f"VLLM_CPU_KVCACHE_SPACE unset or 0: the default {DEFAULT_KVCACHE_GIB} GiB"
            )
        return int(gib * GiB), f"VLLM_CPU_KVCACHE_SPACE={gib} GiB"
