"""The ROCm platform: kvrun-cuda's platform on HIP builds of torch, with ROCm's backends.

ROCm builds of torch expose HIP devices through the ``torch.cuda`` API, so device
choice, memory profiling, the Triton kernels and VLLM_DISABLED_KERNELS come from
:class:`kvrun_cuda.platform.CudaPlatform`; what differs is the identity and the
attention table (no FlashInfer or xFormers wheels for ROCm).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun_cuda.backends import REFERENCE, TRITON_ATTN, BackendEntry
from kvrun_cuda.platform import CudaPlatform

__all__ = ["ROCM_BACKENDS", "ROCM_TRITON_ATTN", "RocmPlatform"]

ROCM_TRITON_ATTN = BackendEntry(
    name="TRITON_ATTN",
    target="kvrun_rocm.attention:RocmTritonAttention",
    module="triton",  # pytorch-triton-rocm installs the same `triton` module
    install="triton",
    head_sizes=TRITON_ATTN.head_sizes,
    dtypes=TRITON_ATTN.dtypes,
    env_options=(("use_triton_flash_attn", "VLLM_USE_TRITON_FLASH_ATTN"),),
)
ROCM_BACKENDS: tuple[BackendEntry, ...] = (ROCM_TRITON_ATTN, REFERENCE)


class RocmPlatform(CudaPlatform):
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
    default_attention_backend = "TRITON_ATTN"
    BACKENDS: ClassVar[tuple[BackendEntry, ...]] = ROCM_BACKENDS

    def describe(self) -> str:
        index = torch.cuda.current_device()
        return f"rocm:{index} ({torch.cuda.get_device_name(index)}, HIP {torch.version.hip})"
