"""The CUDA platform: device choice, attention backends, kernels and the KV-cache budget."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.errors import ConfigError
from kvrun.platforms import KVCachePlan, KVCacheRequest, Platform
from kvrun.platforms.base import DecodeForward
from kvrun.platforms.memory import device_memory_budget
from kvrun_cuda.backends import (
    CUDA_BACKENDS,
    FP8_BACKENDS,
    BackendEntry,
    build_backend,
    choose_attention_backend,
    choose_fp8_backend,
    dtype_name,
    module_installed,
)
from kvrun_cuda.cuda_graphs import DecodeGraphRunner, eager_reason
from kvrun_cuda.devices import device_index
from kvrun_cuda.fp8 import FP8_KV_DTYPE, FP8_KV_DTYPES, LayerScales
from kvrun_cuda.kernels import select_ops, triton_kernels
from kvrun_cuda.libraries import CUDART, NCCL, FoundLibrary, find_library
from kvrun_cuda.memory import MemorySnapshot, aligned_latent_request, profiled_kv_budget
from kvrun_cuda.sampler import flashinfer_sampler, flashinfer_top_k_top_p

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.distributed.communicator import CustomAllReduce
    from kvrun.distributed.state import ProcessGroups
    from kvrun.envs import EnvSnapshot
    from kvrun.sampling.truncation import TopKTopPSampler

__all__ = ["CudaPlatform", "check_backend_dtype", "refused_settings"]

logger = logging.getLogger("kvrun.cuda")  # under "kvrun", the logger entry points configure


def refused_settings(env: EnvSnapshot) -> list[str]:
    """Why each cuda-group setting kvrun-cuda cannot honour is an error (not a warning:
    it asks for kernels that would change results). Variables that merely have no effect
    are warned about by the core (kvrun.env_effects)."""
    errors: list[str] = []
    if env.VLLM_TEST_FORCE_FP8_MARLIN:
        errors.append(
            "VLLM_TEST_FORCE_FP8_MARLIN=1 forces FP8 Marlin kernels, which kvrun-cuda does not "
            "have (no fp8 weight path yet); unset it"
        )
    return errors


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"  # torch.distributed's NCCL, and custom_all_reduce where P2P allows
    priority = 100
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    )
    # Declared default; the actual choice is the first runnable of BACKENDS (logged).
    default_attention_backend = "TRITON_ATTN"
    # In order of preference for the automatic choice.
    BACKENDS: ClassVar[tuple[BackendEntry, ...]] = CUDA_BACKENDS
    # kv_cache_dtype=fp8 / fp8_e4m3: the FP8_BACKENDS store e4m3 (no e5m2 path).
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = (FP8_KV_DTYPE,)
    # The backends that read an fp8 cache, in order of preference for the automatic choice.
    FP8_BACKENDS: ClassVar[tuple[BackendEntry, ...]] = FP8_BACKENDS

    def __init__(self, env: EnvSnapshot) -> None:
        super().__init__(env)
        # One backend per (name, layer spec): every layer shares its per-step plan.
        self._backends: dict[tuple[str, AttentionLayerSpec], AttentionBackend] = {}
        self._memory: MemorySnapshot | None = None  # set by measure_peak_memory

    # identity -------------------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        # bf16 needs compute capability 8.0 (Ampere); older GPUs run fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def setup_process(self, rank: int = 0) -> None:
        """Bind this process to GPU LOCAL_RANK (when set) or ``rank`` among the visible ones."""
        local_rank = self.env.LOCAL_RANK if self.env.source("LOCAL_RANK") == "environment" else rank
        index = device_index(local_rank, self.env.CUDA_VISIBLE_DEVICES, torch.cuda.device_count())
        torch.cuda.set_device(index)

    def describe(self) -> str:
        index = torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda})"

    def nccl_library(self) -> FoundLibrary:
        """NCCL per VLLM_NCCL_SO_PATH, LD_LIBRARY_PATH, CUDA_HOME (for tensor parallelism)."""
        env = self.env
        return find_library(NCCL, env.VLLM_NCCL_SO_PATH, env.LD_LIBRARY_PATH, env.CUDA_HOME)

    def cudart_library(self) -> FoundLibrary:
        """The CUDA runtime per VLLM_CUDART_SO_PATH, LD_LIBRARY_PATH, CUDA_HOME."""
        env = self.env
        return find_library(CUDART, env.VLLM_CUDART_SO_PATH, env.LD_LIBRARY_PATH, env.CUDA_HOME)

    def custom_all_reduce(
        self, groups: ProcessGroups, dtype: torch.dtype
    ) -> tuple[CustomAllReduce | None, str]:
        """The all-reduce over peer-to-peer memory where the group's GPUs allow it
        (kvrun_cuda.custom_all_reduce; VLLM_SKIP_P2P_CHECK trusts the driver's report)."""
        from kvrun_cuda.custom_all_reduce import custom_all_reduce

        return custom_all_reduce(groups, dtype, self.env.VLLM_SKIP_P2P_CHECK)

    # attention ------------------------------------------------------------------
    def attention_backends(self) -> Mapping[str, type[AttentionBackend]]:
        """The offered backends whose packages are installed and whose classes import."""
        found: dict[str, type[AttentionBackend]] = {}
        for entry in self.BACKENDS:
            if entry.module is not None and not module_installed(entry.module):
                continue
            try:
                found[entry.name] = entry.load()
            except ImportError as exc:
                logger.debug("attention backend %s does not import: %s", entry.name, exc)
        return found

    def attention_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        if spec.kv_cache_dtype in FP8_KV_DTYPES:
            return self._fp8_backend(name, spec)
        choice = choose_attention_backend(name, spec, spec.dtype, self.BACKENDS, self.name)
        key = (choice.entry.name, spec)
        backend = self._backends.get(key)
        if backend is None:
            logger.info("%s", choice.log_line(self.name))
            backend = build_backend(choice.entry, spec, self.env)
            self._backends[key] = backend
        return backend

    def _fp8_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        """A backend of FP8_BACKENDS: TRITON_ATTN where triton runs the layer, else
        REFERENCE_FP8; a named backend that cannot read fp8, or cannot run, is refused."""
        choice = choose_fp8_backend(name, spec, self.FP8_BACKENDS, self.name)
        # The spec's kv_cache_dtype keeps these apart from the same names without fp8.
        key = (choice.entry.name, spec)
        backend = self._backends.get(key)
        if backend is None:
            logger.info("%s", choice.log_line(self.name, spec.kv_cache_dtype))
            backend = build_backend(choice.entry, spec, self.env)
            self._backends[key] = backend
        return backend

    def reserved_kv_blocks(self, config: EngineConfig) -> int:
        """One block for the padding rows of captured decode graphs, when they will run."""
        why = eager_reason(config.enforce_eager, config.attention_backend, config.kv_cache_dtype)
        return 0 if why else 1

    def decode_graph_runner(
        self, forward: DecodeForward, config: EngineConfig, pad_slot: int
    ) -> DecodeGraphRunner | None:
        """Captured decode graphs for the engine's model step, or None (eager) with the
        reason logged. ``pad_slot`` lies in the block :meth:`reserved_kv_blocks` asked for."""
        why = eager_reason(config.enforce_eager, config.attention_backend, config.kv_cache_dtype)
        if why is not None:
            logger.info("decode steps run eagerly: %s", why)
            return None
        runner = DecodeGraphRunner(
            forward,
            config.max_num_seqs,
            config.max_model_len,
            config.block_size,
            pad_slot,
            self.device,
        )
        runner.capture_all()
        logger.info("captured CUDA graphs for decode batch sizes %s", runner.sizes)
        return runner

    # configuration --------------------------------------------------------------
    def check_config(self, config: EngineConfig) -> tuple[EngineConfig, list[str]]:
        config, reasons = super().check_config(config)
        check_backend_dtype(self.BACKENDS, config.attention_backend, config.dtype)
        errors = refused_settings(self.env)
        if errors:
            raise ConfigError("; ".join(errors))
        return config, reasons

    # kernels --------------------------------------------------------------------
    def ops(self) -> Mapping[str, Callable[..., Any]]:
        align_in_triton = self.env.VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON
        kernels, why = triton_kernels(align_in_triton)
        logger.info("%s", why)
        chosen, notes = select_ops(
            kernels, self.env.VLLM_DISABLED_KERNELS, self.env.VLLM_USE_TRITON_AWQ
        )
        for note in notes:
            logger.info("%s", note)
        if "fused_moe" in chosen:  # debug: most models have no mixture
            logger.debug(
                "fused_moe: tokens sorted by expert in %s (VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON=%d)",
                "Triton" if align_in_triton else "torch",
                int(align_in_triton),
            )
        return chosen

    # sampling -------------------------------------------------------------------
    def top_k_top_p_sampler(self) -> TopKTopPSampler | None:
        """FlashInfer's top-k/top-p kernel per VLLM_USE_FLASHINFER_SAMPLER, else None."""
        fn, why = flashinfer_sampler(self.env.VLLM_USE_FLASHINFER_SAMPLER)
        logger.info("sampling: %s", why)
        return None if fn is None else flashinfer_top_k_top_p(fn)

    # KV cache -------------------------------------------------------------------
    def measure_peak_memory(self, run_dummy_forward: Callable[[], None]) -> int:
        """Run the engine's dummy forward at its largest batch; return the peak bytes.

        The hook the engine calls after loading the weights and before planning the
        cache; :meth:`kv_cache_budget` then budgets from what was measured.
        """
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run_dummy_forward()
        torch.cuda.synchronize()
        # The dummy's throwaway caches must not leave scales the real cache could inherit.
        self.discard_calibration()
        free, total = torch.cuda.mem_get_info()
        self._memory = MemorySnapshot(
            total=total,
            free=free,
            torch_peak=torch.cuda.max_memory_allocated(),
            torch_reserved=torch.cuda.memory_reserved(),
        )
        return self._memory.torch_peak

    def discard_calibration(self) -> None:
        """Forget the fp8 scales (REFERENCE_FP8's and the fp8 TRITON_ATTN's), which are
        measured on a layer's first write: after the profiling forward and the engine's
        warm-up, the first real request measures them."""
        for backend in self._backends.values():
            scales = getattr(backend, "scales", None)
            if isinstance(scales, LayerScales):
                scales.clear()

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        index = torch.cuda.current_device()
        where = f"cuda:{index}"
        if self._memory is not None:
            return profiled_kv_budget(self._memory, request.gpu_memory_utilization, where)
        free, total = torch.cuda.mem_get_info(index)
        budget, why = device_memory_budget(free, total, request.model_bytes, where)
        return budget, why + " (activations not profiled: no profiling forward ran)"

    def plan_kv_cache(self, request: KVCacheRequest) -> KVCachePlan:
        """The base plan; a latent (MLA) cache's entries padded to 256 bytes under
        VLLM_CUDA_MEM_ALIGN_KV_CACHE (kvrun_cuda.memory.aligned_latent_request)."""
        budgeted, padding = aligned_latent_request(request, self.env.VLLM_CUDA_MEM_ALIGN_KV_CACHE)
        plan = super().plan_kv_cache(budgeted)
        if not padding:
            return plan
        return replace(
            plan,
            entry_padding=padding,
            reason=plan.reason + f"; latent entries padded from {request.head_dim} to "
            f"{budgeted.head_dim} values (VLLM_CUDA_MEM_ALIGN_KV_CACHE)",
        )


def check_backend_dtype(offered: Sequence[BackendEntry], backend: str, dtype: torch.dtype) -> None:
    """A ConfigError when the chosen backend does not run the resolved model dtype."""
    entry = next((e for e in offered if e.name == backend), None)
    if entry is None or dtype in entry.dtypes:
        return
    accepted = ", ".join(dtype_name(d) for d in entry.dtypes)
    others = ", ".join(e.name for e in offered if dtype in e.dtypes)
    raise ConfigError(
        f"attention backend {backend} does not run dtype {dtype_name(dtype)} (it runs: "
        f"{accepted}); choose one of those dtypes, or a backend that runs "
        f"{dtype_name(dtype)} with VLLM_ATTENTION_BACKEND ({others})"
    )
