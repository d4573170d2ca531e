"""The CPU platform."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.host_cpu import host_cpu
from kvrun.platforms import DecodeGraphRunner, KVCachePlan, KVCacheRequest, Platform
from kvrun.scheduling import FreeBlockPolicy, MostRecentlyFreedFirst
from kvrun_cpu.attention import IpexAttention, TorchSdpaAttention
from kvrun_cpu.attention.ipex import ipex_status, ipex_unavailable
from kvrun_cpu.native import BuildSettings, NativeKernels, load_native
from kvrun_cpu.native.decoder import NativeDecoder, unsupported_reason
from kvrun_cpu.ops import cpu_ops
from kvrun_cpu.threads import apply_threads_bind, format_cores, parse_threads_bind

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.envs import EnvSnapshot

__all__ = ["CpuPlatform"]

logger = logging.getLogger("kvrun.cpu")  # under "kvrun", the logger entry points configure

GiB = 1 << 30
# VLLM_CPU_KVCACHE_SPACE of 0 (its default) means this many GiB, as in vLLM.
DEFAULT_KVCACHE_GIB = 4


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = 0
    # dtype="auto" is float32. bf16 is faster only with the native kernels' AVX512-BF16
    # build (BENCHMARKS.md), and its prefill attention (torch SDPA) rounds differently
    # when a prompt arrives in other chunks (a prefix-cache hit, the token budget),
    # enough to change seeded samples between two identical requests (NOTES.md).
    # float32 keeps greedy output equal to transformers' and seeds reproducible; bf16
    # is `dtype="bfloat16"`.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    # Measured fastest (benchmarks/bench_attention.py, README.md).
    default_attention_backend = TorchSdpaAttention.name

    def __init__(self, env: EnvSnapshot) -> None:
        super().__init__(env)
        # One backend per (name, layer spec): layers that share a spec share its batch
        # plan and gather buffers instead of each holding their own.
        self._backends: dict[tuple[str, AttentionLayerSpec], AttentionBackend] = {}
        self._native: tuple[NativeKernels | None, str] | None = None  # built on first use
        self._ipex: tuple[bool, str] | None = None  # (usable, why), probed on first use

    # identity -------------------------------------------------------------------
    def setup_process(self, rank: int = 0) -> None:
        """Bind this rank's threads as VLLM_CPU_OMP_THREADS_BIND says ("all": leave them)."""
        cores = parse_threads_bind(
            self.env.VLLM_CPU_OMP_THREADS_BIND, rank, os.sched_getaffinity(0)
        )
        if cores is not None:
            apply_threads_bind(cores)

    def describe(self) -> str:
        """ "cpu (<model>: <features>; torch <isa>; N threads on cores ...; native kernels
        <isa>)": AMX_BF16 where the bf16 matmuls run on AMX tiles."""
        isa = torch.backends.cpu.get_cpu_capability()
        cores = format_cores(os.sched_getaffinity(0))
        line = (
            f"{self.name} ({host_cpu().describe()}; torch {isa}; "
            f"{torch.get_num_threads()} threads on cores {cores}"
        )
        if self._native is not None:
            native = self._native[0]
            if native is None:
                line += "; torch kernels"
            else:  # the note says why a wider ISA (AMX) this CPU has is unused
                line += f"; native kernels {native.isa}"
                line += f" ({native.note})" if native.note else ""
        return line + ")"

    # attention ------------------------------------------------------------------
    def attention_backends(self) -> Mapping[str, type[AttentionBackend]]:
        backends: dict[str, type[AttentionBackend]] = {
            ReferenceAttention.name: ReferenceAttention,
            TorchSdpaAttention.name: TorchSdpaAttention,
        }
        if self.ipex_status()[0]:
            backends[IpexAttention.name] = IpexAttention
        return backends

    def attention_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        chosen = name or self.default_attention_backend
        backend = self._backends.get((chosen, spec))
        if backend is None:
            if chosen == TorchSdpaAttention.name:
                backend = TorchSdpaAttention(spec, native=self.native_kernels())
            elif chosen == IpexAttention.name and not self.ipex_status()[0]:
                raise ipex_unavailable(self.ipex_status()[1])  # says how to install it
            else:
                backend = super().attention_backend(name, spec)  # validates the name
            self._backends[(chosen, spec)] = backend
        return backend

    def ipex_status(self) -> tuple[bool, str]:
        """Whether intel-extension-for-pytorch imports here (imported on the first call)."""
        if self._ipex is None:
            self._ipex = ipex_status()
            logger.debug("IPEX attention: %s", self._ipex[1])
        return self._ipex

    def native_kernels(self) -> NativeKernels | None:
        """The native kernels, built once under $VLLM_CACHE_ROOT/kvrun_cpu; None if they
        cannot be built (the reason is logged and the ops keep their torch paths)."""
        if self._native is None:
            cache_dir = Path(self.env.VLLM_CACHE_ROOT) / "kvrun_cpu"
            settings = BuildSettings.from_env(self.env)
            native, why = load_native(cache_dir, torch.get_num_threads(), settings=settings)
            if native is None:
                logger.warning("native kernels unavailable, using torch: %s", why)
            else:
                logger.info("native kernels: %s", why)
            self._native = (native, why)
        return self._native[0]

    # KV cache -------------------------------------------------------------------
    def allocate_kv_cache(self, plan: KVCachePlan, num_layers: int) -> list[torch.Tensor]:
        """Zeroed caches whose pages the OS supplies on first touch.

        numpy's zeros come from calloc, so a 4 GiB cache costs nothing until blocks are
        used, where torch.zeros writes every page up front (NOTES.md: first touch). The
        offline ``LLM`` keeps it lazy (fast start, memory as used); ``kvrun serve``
        commits it all before it is ready (``LLMEngine.warm_up(commit_kv_cache=True)``).
        """
        nbytes = plan.total_bytes // plan.num_layers
        return [
            torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))
            .view(plan.dtype)
            .view(plan.layer_shape)
            for _ in range(num_layers)
        ]

    def free_block_policy(self, config: EngineConfig) -> FreeBlockPolicy | None:
        """The block freed last first: its pages are mapped and warm, where a block never
        used yet costs the first-touch page faults the calloc'd cache defers (NOTES.md)."""
        return MostRecentlyFreedFirst()

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        gib = self.env.VLLM_CPU_KVCACHE_SPACE
        if gib == 0:
            return DEFAULT_KVCACHE_GIB * GiB, (
                f"VLLM_CPU_KVCACHE_SPACE unset or 0: the default {DEFAULT_KVCACHE_GIB} GiB"
            )
        return int(gib * GiB), f"VLLM_CPU_KVCACHE_SPACE={gib} GiB"

    # kernels --------------------------------------------------------------------
    def ops(self) -> Mapping[str, Callable[..., Any]]:
        return cpu_ops(self.native_kernels())

    def fused_decoder(
        self, model: Any, kv_caches: list[torch.Tensor], config: EngineConfig
    ) -> DecodeGraphRunner | None:
        """Every decode-only step in one native call (float32 or bfloat16 Llama family on
        TORCH_SDPA); None, with the reason logged, where that does not apply."""
        native = self.native_kernels()
        why = "the native kernels are unavailable" if native is None else None
        why = why or unsupported_reason(model, kv_caches)
        if why is not None:
            logger.info("decode steps run op by op: %s", why)
            return None
        return NativeDecoder(native, model, kv_caches, config.max_num_seqs)
