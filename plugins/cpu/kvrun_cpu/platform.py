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
# Native kernel builds whose bf16 matmuls run in hardware (vdpbf16ps, AMX tiles): there
# bf16 is ~2x float32's throughput, so dtype="auto" is bfloat16.
BF16_ISAS = frozenset({"AMX_BF16", "AVX512_BF16"})
# VLLM_CPU_KVCACHE_SPACE of 0 (its default) means this many GiB, as in vLLM.
DEFAULT_KVCACHE_GIB = 4


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = 0
    # dtype="auto" is default_dtype(): bfloat16 where the native kernels' build has
    # bf16 in hardware (AVX512_BF16, AMX), float32 elsewhere. Exact parity with
    # transformers' float32 asks for `dtype="float32"`.
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    # GGUF matrices run as stored with quantization="gguf" (kvrun_cpu.native.quantized;
    # without the native kernels, through the reference ops: dequantized per call).
    quantized_gguf_types: ClassVar[frozenset[str]] = frozenset(
        {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
    )
    # AWQ 4-bit layers run as stored with quantization="awq" (the same module, format QAWQ).
    quantized_awq: ClassVar[bool] = True
    # Measured fastest (benchmarks/bench_attention.py, README.md).
    default_attention_backend = TorchSdpaAttention.name

    def __init__(self, env: EnvSnapshot) -> None:
        super().__init__(env)
        # One backend per (name, layer spec): layers that share a spec share its batch
        # plan and gather buffers instead of each holding their own.
        self._backends: dict[tuple[str, AttentionLayerSpec], AttentionBackend] = {}
        self._native: tuple[NativeKernels | None, str] | None = None  # built on first use
        self._ipex: tuple[bool, str] | None = None  # (usable, why), probed on first use
        self._default_dtype: torch.dtype | None = None  # decided (and logged) on first use

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

    def default_dtype(self) -> torch.dtype:
        """dtype="auto": bfloat16 where the native kernels run bf16 in hardware (the
        AVX512_BF16 or AMX build), float32 elsewhere (AVX2, no compiler), as vLLM's cpu
        platform picks bfloat16 where AVX512_BF16 is. Safe because a prompt's bf16 bits do
        not depend on its chunks or batch (the native prefill attention). Logged once."""
        if self._default_dtype is None:
            native = self.native_kernels()
            if native is not None and native.isa in BF16_ISAS:
                self._default_dtype = torch.bfloat16
                why = f"the native kernels run bf16 in hardware ({native.isa})"
            else:
                self._default_dtype = torch.float32
                built = "unavailable" if native is None else f"built for {native.isa}"
                why = f"no hardware bf16 (the native kernels are {built})"
            name = str(self._default_dtype).removeprefix("torch.")
            logger.info("dtype=auto is %s on cpu: %s", name, why)
        return self._default_dtype

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
        TORCH_SDPA), LoRA adapters included once the model runner attaches their slots
        (NativeDecoder.attach_lora); None, with the reason logged, where that does not
        apply."""
        native = self.native_kernels()
        why = "the native kernels are unavailable" if native is None else None
        why = why or unsupported_reason(model, kv_caches)
        if why is not None:
            logger.info("decode steps run op by op: %s", why)
            return None
        return NativeDecoder(native, model, kv_caches, config.max_num_seqs)
