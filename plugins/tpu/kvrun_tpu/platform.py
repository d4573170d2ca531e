"""The TPU platform: identity, dtypes, KV-cache budget, attention and the XLA runner.

The budget is 0.9 of the TPU's HBM limit minus what is already in use (weights
included), read from torch_xla's memory info, less one block for the padding sink.
XLA compiles graphs lazily, so activation and compilation peaks are not profiled yet.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.errors import PluginError
from kvrun.platforms import KVCacheRequest, Platform
from kvrun_tpu.attention import PallasPagedAttention, XlaPagedAttention
from kvrun_tpu.buckets import BucketSpec
from kvrun_tpu.runner import XlaModelRunner

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.engine.model_runner import CausalLM
    from kvrun_tpu.executor import XlaModelExecutor

__all__ = ["MEMORY_FRACTION", "TpuPlatform", "hbm_budget", "pallas_usable"]

logger = logging.getLogger(__name__)

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


def pallas_usable() -> bool:
    """The Pallas kernels run only on a real TPU, and torch_xla traces them through jax."""
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU" and importlib.util.find_spec("jax") is not None


class TpuPlatform(Platform):
    name = "tpu"
    device_type = "xla"
    dist_backend = "xla"  # torch-xla's collectives
    parallel_unsupported = (
        "the tpu platform runs a whole-model torch-xla executor that kvrun does not shard "
        "yet (its collectives would be XLA's, the 'xla' backend)"
    )
    priority = 80
    # TPUs compute in bf16 natively; fp16 is emulated and slow.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float32)

    default_attention_backend = XlaPagedAttention.name

    def setup_process(self, rank: int = 0) -> None:
        """Point XLA's persistent compile cache at VLLM_XLA_CACHE_PATH (before any graph)."""
        import torch_xla
        import torch_xla.runtime as xr

        path = self.env.VLLM_XLA_CACHE_PATH
        if torch_xla._XLAC._xla_computation_cache_is_initialized():
            # XLA fixes its cache at the first computation; a second engine in one
            # process keeps the first one's cache.
            logger.warning("XLA computed before set-up; VLLM_XLA_CACHE_PATH=%s not applied", path)
            return
        xr.initialize_cache(path, readonly=rank != 0)

    def describe(self) -> str:
        import torch_xla.runtime as xr

        return f"{self.name} (PJRT device {xr.device_type()})"

    def attention_backends(self) -> Mapping[str, type[AttentionBackend]]:
        backends: dict[str, type[AttentionBackend]] = {XlaPagedAttention.name: XlaPagedAttention}
        if pallas_usable():
            backends[PallasPagedAttention.name] = PallasPagedAttention
        return backends

    def attention_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        """PALLAS by default where it runs (a TPU with jax), else XLA_PAGED."""
        if name is None and PallasPagedAttention.name in self.attention_backends():
            name = PallasPagedAttention.name
        return super().attention_backend(name, spec)

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        try:
            info = xm.get_memory_info(self.device)
        except RuntimeError as exc:  # PJRT's CPU client keeps no allocator stats
            raise PluginError(
                f"the tpu platform cannot size the KV cache: torch_xla reports no memory "
                f"for PJRT device {xr.device_type()!r} ({exc}); set num_kv_blocks "
                "(--num-kv-blocks)"
            ) from exc
        budget, why = hbm_budget(dict(info))
        # The attention layout adds a sink block for bucket padding (kvrun_tpu.attention).
        return max(0, budget - request.bytes_per_block), why + ", less one padding block"

    def model_executor(self, config: EngineConfig) -> XlaModelExecutor:
        """The engine runs the core model through XLA, bucketed (kvrun_tpu.executor)."""
        from kvrun_tpu.executor import XlaModelExecutor

        return XlaModelExecutor(self, config)

    def make_runner(
        self, model: CausalLM, kv_caches: list[torch.Tensor], config: EngineConfig
    ) -> XlaModelRunner:
        """The XLA runner for this engine; its buckets come from the scheduler limits."""
        buckets = BucketSpec(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
        )
        check = self.env.VLLM_XLA_CHECK_RECOMPILATION
        return XlaModelRunner(
            model, kv_caches, buckets, config.num_kv_blocks, self.device, check_recompilation=check
        )
