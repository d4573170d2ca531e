"""The Gaudi (HPU) platform: device identity, dtypes and a first-cut KV-cache budget.

First cut: the budget is 0.9 of the device memory minus the weights, capped by what is
free, from habana_frameworks' mem_get_info (the torch.cuda-style API). Graph
compilation and activation peaks are not profiled yet.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.platforms import KVCacheRequest, Platform

__all__ = ["MEMORY_FRACTION", "HpuPlatform"]

GiB = 1 << 30
# The share of device memory this process may use, as vLLM's gpu_memory_utilization.
MEMORY_FRACTION = 0.9


class HpuPlatform(Platform):
    name = "hpu"
    device_type = "hpu"
    dist_backend = "hccl"
    priority = 70
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float32)

    def setup_process(self) -> None:
        # Registers the "hpu" device type and the "hccl" backend with torch.
        import habana_frameworks.torch.core  # noqa: F401

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        import habana_frameworks.torch.hpu as hthpu

        free, total = (int(x) for x in hthpu.mem_get_info())
        share = int(total * MEMORY_FRACTION)
        wanted = share - request.model_bytes
        cap = free - (total - share)
        budget = max(0, min(wanted, cap))
        reason = (
            f"{MEMORY_FRACTION} of {total / GiB:.2f} GiB HPU memory minus "
            f"{request.model_bytes / GiB:.2f} GiB of weights"
        )
        if cap < wanted:
            reason += f", capped to {budget / GiB:.2f} GiB by {free / GiB:.2f} GiB free"
        return budget, reason
