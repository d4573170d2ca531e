"""The ROCm platform: kvrun-cuda's platform on HIP builds of torch, with ROCm's backends.

ROCm builds of torch expose HIP devices through the ``torch.cuda`` API, so device
choice, memory profiling, the Triton kernels and VLLM_DISABLED_KERNELS come from
:class:`kvrun_cuda.platform.CudaPlatform`; what differs is the identity, the
attention table (no FlashInfer or xFormers wheels for ROCm) and the fp8 KV-cache
format on MI300 (:func:`fp8_kv_dtype`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import torch

from kvrun_cuda.backends import REFERENCE, TRITON_ATTN, BackendEntry, dtype_name
from kvrun_cuda.fp8 import FP8_KV_DTYPE
from kvrun_cuda.platform import CudaPlatform

if TYPE_CHECKING:
    from kvrun.distributed.communicator import CustomAllReduce
    from kvrun.distributed.state import ProcessGroups

__all__ = ["ROCM_BACKENDS", "ROCM_TRITON_ATTN", "RocmPlatform", "fp8_kv_dtype"]

logger = logging.getLogger("kvrun.rocm")

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


def fp8_kv_dtype(arch: str) -> torch.dtype:
    """The fp8 e4m3 format to store a KV cache in on a GPU of this architecture.

    ``arch`` is torch's ``gcnArchName`` (e.g. "gfx942:sramecc+:xnack-"). MI300 (gfx940,
    gfx941, gfx942) converts to and from e4m3 in hardware only in its FNUZ variant,
    ``float8_e4m3fnuz`` (max 240, no negative zero, NaN is 0x80); an OCP
    ``float8_e4m3fn`` cache would be converted in software on every access. Later AMD
    GPUs (gfx950, gfx12) use the OCP format, as NVIDIA's do.
    """
    return torch.float8_e4m3fnuz if arch.startswith("gfx94") else FP8_KV_DTYPE


class RocmPlatform(CudaPlatform):
    name = "rocm"
    # ROCm builds of torch name HIP devices "cuda" and put RCCL behind the "nccl" backend.
    device_type = "cuda"
    dist_backend = "nccl"  # RCCL: ROCm torch serves it as the "nccl" backend
    priority = 90
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )
    default_attention_backend = "TRITON_ATTN"
    BACKENDS: ClassVar[tuple[BackendEntry, ...]] = ROCM_BACKENDS
    # kv_cache_dtype=fp8 / fp8_e4m3 is stored as fp8_kv_dtype(the device's arch).
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = (FP8_KV_DTYPE, torch.float8_e4m3fnuz)

    def custom_all_reduce(
        self, groups: ProcessGroups, dtype: torch.dtype
    ) -> tuple[CustomAllReduce | None, str]:
        """RCCL's all-reduce: kvrun-rocm has no peer-to-peer all-reduce of its own."""
        return None, "RCCL's all-reduce (kvrun-rocm has no peer-to-peer all-reduce)"

    def describe(self) -> str:
        index = torch.cuda.current_device()
        return f"rocm:{index} ({torch.cuda.get_device_name(index)}, HIP {torch.version.hip})"

    def resolve_kv_cache_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype | None:
        """As the base class, with fp8 e4m3 stored in the current device's own format."""
        dtype = super().resolve_kv_cache_dtype(name, model_dtype)
        if dtype != FP8_KV_DTYPE:
            return dtype
        arch = torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName
        fp8 = fp8_kv_dtype(arch)
        logger.info("kv_cache_dtype=%s: stored as %s on %s", name, dtype_name(fp8), arch)
        return fp8
