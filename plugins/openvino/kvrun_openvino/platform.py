"""The OpenVINO platform: device checks and the VLLM_OPENVINO_KVCACHE_SPACE budget.

The torch side runs on the host (tensors live in host memory); OpenVINO compiles the
model for VLLM_OPENVINO_DEVICE and runs it, attention included, as the platform's
whole-model executor (kvrun_openvino.executor).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import torch

from kvrun.errors import ConfigError
from kvrun.host_cpu import host_cpu
from kvrun.platforms import KVCacheRequest, Platform

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun_openvino.executor import OpenvinoExecutor

__all__ = ["CPU_BLOCK_SIZE", "DEFAULT_KVCACHE_GIB", "OpenvinoPlatform"]

GiB = 1 << 30
# VLLM_OPENVINO_KVCACHE_SPACE of 0 (its default) means this many GiB, as in vLLM.
DEFAULT_KVCACHE_GIB = 4
# The CPU plugin's paged attention lays its cache out in blocks of 32 tokens, whatever
# the graph asks; the executor checks the compiled model agrees.
CPU_BLOCK_SIZE = 32
# OpenVINO meta-devices that name other devices ("AUTO", "HETERO:GPU,CPU"); the
# runtime resolves them, so they are not in available_devices.
_META_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


class OpenvinoPlatform(Platform):
    name = "openvino"
    device_type = "cpu"
    dist_backend = "gloo"
    parallel_unsupported = (
        "OpenVINO runs the whole model as one compiled graph in one process, which kvrun "
        "does not shard; use the cpu platform (VLLM_TARGET_DEVICE=cpu) for "
        "tensor_parallel_size/pipeline_parallel_size > 1"
    )
    # Below cpu (0): with the openvino stack installed beside kvrun-cpu (as in kvrun's own
    # dev environment), an unset VLLM_TARGET_DEVICE keeps the reference cpu platform;
    # VLLM_TARGET_DEVICE=openvino selects this one. It never displaces a GPU either way.
    priority = -1
    # CPU is the default device; check_config corrects any block size CPU cannot use.
    default_block_size = CPU_BLOCK_SIZE
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )

    def setup_process(self, rank: int = 0) -> None:
        import openvino

        device = self.env.VLLM_OPENVINO_DEVICE
        if device.split(":")[0] in _META_DEVICES:
            return
        available = list(openvino.Core().available_devices)
        # "GPU" names the first of "GPU.0", "GPU.1", ...
        if device not in available and not any(d.split(".")[0] == device for d in available):
            raise ConfigError(
                f"VLLM_OPENVINO_DEVICE={device!r} is not a device this OpenVINO runtime "
                f"offers; available: {', '.join(available)}"
            )

    def describe(self) -> str:
        device = self.env.VLLM_OPENVINO_DEVICE
        if device.split(".")[0] != "CPU":
            return f"openvino ({device})"
        # Which kernels the CPU plugin picks (AMX, AVX512_FP16) follows these features.
        return f"openvino ({device}: {host_cpu().describe()})"

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        gib = self.env.VLLM_OPENVINO_KVCACHE_SPACE
        if gib == 0:
            return DEFAULT_KVCACHE_GIB * GiB, (
                f"VLLM_OPENVINO_KVCACHE_SPACE unset or 0: the default {DEFAULT_KVCACHE_GIB} GiB"
            )
        return int(gib * GiB), f"VLLM_OPENVINO_KVCACHE_SPACE={gib} GiB"

    def kv_cache_budget_bytes(self) -> tuple[int, str]:
        """The KV budget with no request: the executor sizes blocks from its compiled model."""
        return self.kv_cache_budget(_NO_REQUEST)

    def check_config(self, config: EngineConfig) -> tuple[EngineConfig, list[str]]:
        config, reasons = super().check_config(config)
        if self.env.VLLM_OPENVINO_DEVICE == "CPU" and config.block_size != CPU_BLOCK_SIZE:
            reasons.append(
                f"block_size {config.block_size} -> {CPU_BLOCK_SIZE}: OpenVINO's CPU paged "
                "attention keeps KV blocks of 32 tokens"
            )
            config = replace(config, block_size=CPU_BLOCK_SIZE)
        return config, reasons

    def model_executor(self, config: EngineConfig) -> OpenvinoExecutor:
        from kvrun_openvino.build import build_executor

        return build_executor(self.env, config, self.kv_cache_budget_bytes())


# kv_cache_budget reads only the environment; this stands in for the request it takes.
_NO_REQUEST = KVCacheRequest(
    num_layers=1,
    num_kv_heads=1,
    head_dim=1,
    block_size=1,
    dtype=torch.float32,
    max_model_len=1,
    layer_shape=lambda n: (n,),
)
