"""GPU KV-cache budget from a profiled peak, and the 256-byte cache-entry alignment.

The arithmetic is pure (bytes in, bytes out) so it is tested on CPU; the measuring
(``torch.cuda.max_memory_allocated`` around a dummy forward) lives in the platform.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.errors import ConfigError

__all__ = ["KV_ALIGN_BYTES", "MemorySnapshot", "aligned_entry_elems", "profiled_kv_budget"]

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
    (the cache is then a strided view of the padded storage). vLLM applies this to
    multi-head latent attention entries only; kvrun has no MLA model yet, so the
    platform passes ``enabled`` only for MLA layouts and today's caches are unchanged.
    """
    if not enabled:
        return entry_elems
    assert KV_ALIGN_BYTES % elem_size == 0, elem_size
    per = KV_ALIGN_BYTES // elem_size
    return -(-entry_elems // per) * per
