"""The ROCm platform: device identity, dtypes and the KV-cache budget.

Attention and kernels are the core's reference implementations for now.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.platforms import KVCacheRequest, Platform
from kvrun.platforms.memory import device_memory_budget

__all__ = ["RocmPlatform"]


class RocmPlatform(Platform):
    name = "rocm"
    # ROCm builds of torch name HIP devices "cuda" and put RCCL behind the "nccl" backend.
    device_type = "cuda"
    dist_backend = "nccl"
    priority = 90
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )

    def describe(self) -> str:
        index = torch.cuda.current_device()
        return f"rocm:{index} ({torch.cuda.get_device_name(index)}, HIP {torch.version.hip})"

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return device_memory_budget(free, total, request.model_bytes, f"rocm:{index}")
