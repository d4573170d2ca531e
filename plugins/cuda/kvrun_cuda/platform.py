"""The CUDA platform: device identity, dtypes and the KV-cache budget.

Attention and kernels are the core's reference implementations for now; the
FlashInfer/Triton backends land later and will be tested against the reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.platforms import KVCacheRequest, Platform
from kvrun.platforms.memory import device_memory_budget

__all__ = ["CudaPlatform"]


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    priority = 100
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )

    def default_dtype(self) -> torch.dtype:
        # bf16 needs compute capability 8.0 (Ampere); older GPUs run fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def describe(self) -> str:
        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda})"

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return device_memory_budget(free, total, request.model_bytes, f"cuda:{index}")
