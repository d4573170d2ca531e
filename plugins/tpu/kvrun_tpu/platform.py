"""The TPU platform: device identity, dtypes and a first-cut KV-cache budget.

First cut: the budget is 0.9 of the TPU's HBM limit minus what is already in use
(weights included), read from torch_xla's memory info. XLA compiles graphs lazily,
so activation and compilation peaks are not profiled yet.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvrun.errors import PluginError
from kvrun.platforms import KVCacheRequest, Platform

__all__ = ["MEMORY_FRACTION", "TpuPlatform", "hbm_budget"]

GiB = 1 << 30
# The share of HBM this process may use, as vLLM's default gpu_memory_utilization.
MEMORY_FRACTION = 0.9


def hbm_budget(info: dict[str, Any]) -> tuple[int, str]:
    """Bytes for the KV cache from xla_model.get_memory_info's dict, and why."""
    # torch_xla >= 2.4 reports bytes; older releases report KiB.
    if "bytes_limit" in info:
        total, used = int(info["bytes_limit"]), int(info["bytes_used"])
    elif "kb_total" in info:
        total = int(info["kb_total"]) * 1024
        used = total - int(info["kb_free"]) * 1024
    else:
        raise PluginError(
            f"torch_xla memory info has neither bytes_limit nor kb_total: {sorted(info)}"
        )
    budget = max(0, int(total * MEMORY_FRACTION) - used)
    return budget, (
        f"{MEMORY_FRACTION} of {total / GiB:.2f} GiB TPU HBM minus {used / GiB:.2f} GiB in use"
    )


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    dist_backend = "xla"
    priority = 80
    # TPUs compute in bf16 natively; fp16 is emulated and slow.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float32)

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        import torch_xla.core.xla_model as xm

        return hbm_budget(dict(xm.get_memory_info(self.device)))
