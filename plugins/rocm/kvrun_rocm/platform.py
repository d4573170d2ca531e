"""The ROCm platform: device identity, dtypes and the KV-cache budget.

Attention and kernels are the core's reference implementations for now.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.platforms import KVCacheRequest, Platform

__all__ = ["MEMORY_FRACTION", "RocmPlatform", "device_memory_budget"]

GiB = 1 << 30
# vLLM's default gpu_memory_utilization: the share of the device this process may use.
MEMORY_FRACTION = 0.9


def device_memory_budget(free: int, total: int, model_bytes: int, where: str) -> tuple[int, str]:
    """KV-cache bytes: MEMORY_FRACTION of the device minus the weights, capped by what is free.

    The cap keeps the (1 - MEMORY_FRACTION) headroom when other processes or earlier
    allocations already hold memory. First cut: activation peaks are not profiled yet.
    """
    share = int(total * MEMORY_FRACTION)
    wanted = share - model_bytes
    cap = free - (total - share)
    budget = max(0, min(wanted, cap))
    reason = (
        f"{MEMORY_FRACTION} of {total / GiB:.2f} GiB on {where} minus "
        f"{model_bytes / GiB:.2f} GiB of weights"
    )
    if cap < wanted:
        reason += (
            f", capped to {budget / GiB:.2f} GiB because only {free / GiB:.2f} GiB is free "
            "(other allocations hold the rest)"
        )
    return budget, reason


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
