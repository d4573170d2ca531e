"""The OpenVINO platform: device checks and the VLLM_OPENVINO_KVCACHE_SPACE budget.

The torch side runs on the host (tensors live in host memory); OpenVINO compiles the
model for VLLM_OPENVINO_DEVICE. The whole-model executor lands later; until then the
core's reference model and attention run.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvrun.errors import ConfigError
from kvrun.platforms import KVCacheRequest, Platform

__all__ = ["DEFAULT_KVCACHE_GIB", "OpenvinoPlatform"]

GiB = 1 << 30
# VLLM_OPENVINO_KVCACHE_SPACE of 0 (its default) means this many GiB, as in vLLM.
DEFAULT_KVCACHE_GIB = 4
# OpenVINO meta-devices that name other devices ("AUTO", "HETERO:GPU,CPU"); the
# runtime resolves them, so they are not in available_devices.
_META_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")


class OpenvinoPlatform(Platform):
    name = "openvino"
    device_type = "cpu"
    dist_backend = "gloo"
    # Low on purpose: an OpenVINO CPU runtime must never displace a GPU in auto selection.
    priority = 10
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )

    def setup_process(self) -> None:
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
        return f"openvino ({self.env.VLLM_OPENVINO_DEVICE})"

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        gib = self.env.VLLM_OPENVINO_KVCACHE_SPACE
        if gib == 0:
            return DEFAULT_KVCACHE_GIB * GiB, (
                f"VLLM_OPENVINO_KVCACHE_SPACE unset or 0: the default {DEFAULT_KVCACHE_GIB} GiB"
            )
        return int(gib * GiB), f"VLLM_OPENVINO_KVCACHE_SPACE={gib} GiB"
