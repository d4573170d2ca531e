"""The Gaudi (HPU) platform: identity, config adjustments, KV block order, attention, budget.

Device-neutral and tested on the CPU: the default block size 128, ``check_config``
(prefix caching off under ``VLLM_CONTIGUOUS_PA``), ``free_block_policy`` and the flat paged attention
backend. Written against habana_frameworks' documented API but never run (no Gaudi
here): ``setup_process``, ``kv_cache_budget`` and :func:`wrap_in_hpu_graph`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.platforms import KVCacheRequest, Platform
from kvrun.scheduling import FreeBlockPolicy, LowestIdFirst
from kvrun_hpu.attention import HpuFlatAttention

if TYPE_CHECKING:
    from kvrun.config import EngineConfig

__all__ = ["HPU_BLOCK_SIZE", "MEMORY_FRACTION", "HpuPlatform", "wrap_in_hpu_graph"]

GiB = 1 << 30
# The share of device memory this process may use, as vLLM's gpu_memory_utilization.
MEMORY_FRACTION = 0.9
# Gaudi's matrix engines work on 128-wide tiles; vLLM's HPU backend defaults to it.
HPU_BLOCK_SIZE = 128


class HpuPlatform(Platform):
    name = "hpu"
    device_type = "hpu"
    dist_backend = "hccl"
    parallel_unsupported = (
        "kvrun's hpu plugin has not been run with HCCL across Gaudi cards; it serves one "
        "card per engine (tensor_parallel_size=1, pipeline_parallel_size=1)"
    )
    priority = 70
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float32)
    default_attention_backend: ClassVar[str] = HpuFlatAttention.name
    # The engine uses it when the user sets no block_size; an explicit one is kept.
    default_block_size: ClassVar[int] = HPU_BLOCK_SIZE

    def setup_process(self, rank: int = 0) -> None:
        # Registers the "hpu" device type and the "hccl" backend with torch.
        import habana_frameworks.torch.core  # noqa: F401

    def describe(self) -> str:
        layout = "contiguous" if self.env.VLLM_CONTIGUOUS_PA else "flat"
        return f"{self.name} ({self.device}, {layout} paged attention)"

    # attention ------------------------------------------------------------------
    def attention_backends(self) -> Mapping[str, type[AttentionBackend]]:
        return {**super().attention_backends(), HpuFlatAttention.name: HpuFlatAttention}

    def attention_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        chosen = name or self.default_attention_backend
        if chosen == HpuFlatAttention.name:
            return HpuFlatAttention(spec, contiguous=self.env.VLLM_CONTIGUOUS_PA)
        return super().attention_backend(chosen, spec)

    # configuration --------------------------------------------------------------
    def check_config(self, config: EngineConfig) -> tuple[EngineConfig, list[str]]:
        config, reasons = super().check_config(config)
        if self.env.VLLM_CONTIGUOUS_PA and config.enable_prefix_caching:
            reasons.append(
                "enable_prefix_caching True -> False: VLLM_CONTIGUOUS_PA=1 reads each "
                "KV block for one sequence only, so blocks cannot be shared; set "
                "VLLM_CONTIGUOUS_PA=0 to keep prefix caching"
            )
            config = replace(config, enable_prefix_caching=False)
        return config, reasons

    # KV cache -------------------------------------------------------------------
    def free_block_policy(self, config: EngineConfig) -> FreeBlockPolicy | None:
        """Lowest id first under contiguous PA, so the decode range [0, max id] stays short."""
        return LowestIdFirst() if self.env.VLLM_CONTIGUOUS_PA else None

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


def wrap_in_hpu_graph(module: torch.nn.Module) -> torch.nn.Module:
    """Record the module's forward once per input shape and replay it (HPU graphs).

    Unverified (no Gaudi here). Buckets keep the shapes few; the core has no hook yet
    that hands the loaded model to the platform, so nothing calls this.
    """
    import habana_frameworks.torch as htorch

    wrapped: torch.nn.Module = htorch.hpu.wrap_in_hpu_graph(module, disable_tensor_cache=True)
    return wrapped
