"""GPU KV-cache budget from a profiled peak, and the 256-byte cache-entry alignment.

The arithmetic is pure (bytes in, bytes out) so it is tested on CPU; the measuring
(``torch.cuda.max_memory_allocated`` around a dummy forward) lives in the platform.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvrun.errors import ConfigError
from kvrun.platforms import KVCacheRequest

__all__ = [
    "KV_ALIGN_BYTES",
    "MemorySnapshot",
    "aligned_entry_elems",
    "aligned_latent_request",
    "profiled_kv_budget",
]

GiB = 1 << 30
# VLLM_CUDA_MEM_ALIGN_KV_CACHE pads each cache entry to a multiple of this many bytes.
KV_ALIGN_BYTES = 256


@dataclass(frozen=True)
class MemorySnapshot:
    """What the device reported after the profiling forward."""

    total: int  # device memory in bytes (torch.cuda.mem_get_info()[1])
    free: int  # bytes free on the device now, all processes considered
    torch_peak: int  # this process's peak torch allocation: weights + activations
    torch_reserved: int  # bytes this process's caching allocator holds now


def profiled_kv_budget(snapshot: MemorySnapshot, utilization: float, where: str) -> tuple[int, str]:
    """``utilization`` x total - (peak + memory held outside torch), and why.

    Memory used on the device but not by this process's torch allocator (the CUDA
    context, NCCL, other processes) is ``total - free - reserved``; it counts
    against this process's share too, so two engines on one GPU each get what they
    asked for or a clear error, not an out-of-memory in the middle of a step.
    """
    if not 0 < utilization <= 1:
        raise ConfigError(
            f"gpu_memory_utilization={utilization} is out of range; accepted: 0 < value <= 1"
        )
    share = int(snapshot.total * utilization)
    outside = max(0, snapshot.total - snapshot.free - snapshot.torch_reserved)
    budget = max(0, share - snapshot.torch_peak - outside)
    reason = (
        f"{utilization} of {snapshot.total / GiB:.2f} GiB on {where} minus a profiled peak of "
        f"{snapshot.torch_peak / GiB:.2f} GiB (weights and activations at the largest batch)"
    )
    if outside:
        reason += f" and {outside / GiB:.2f} GiB held outside this process's torch allocator"
    return budget, reason


def aligned_entry_elems(entry_elems: int, elem_size: int, enabled: bool) -> int:
    """Elements to allocate for one cache entry of ``entry_elems`` elements.

    With VLLM_CUDA_MEM_ALIGN_KV_CACHE the entry is padded to a multiple of 256 bytes
    (the cache is then a strided view of the padded storage). As in vLLM, only
    multi-head latent attention's single-plane entries are padded
    (:func:`aligned_latent_request`).
    """
    if not enabled:
        return entry_elems
    assert KV_ALIGN_BYTES % elem_size == 0, elem_size
    per = KV_ALIGN_BYTES // elem_size
    return -(-entry_elems // per) * per


def aligned_latent_request(request: KVCacheRequest, enabled: bool) -> tuple[KVCacheRequest, int]:
    """The request to budget blocks by, and the elements of padding per entry.

    A single-plane latent cache (``kv_planes == 1``, one KV head of kv_lora_rank + rope
    values: 576 for DeepSeek-V2, 1152 bytes in bfloat16) with VLLM_CUDA_MEM_ALIGN_KV_CACHE
    pads each entry to a multiple of 256 bytes (1280): blocks are budgeted at the padded
    size and the allocator returns views of the real width. Other caches are unchanged.
    """
    if not enabled or request.kv_planes != 1:
        return request, 0
    elem = torch.empty((), dtype=request.dtype).element_size()
    width = aligned_entry_elems(request.head_dim, elem, True)
    return replace(request, head_dim=width), width - request.head_dim
