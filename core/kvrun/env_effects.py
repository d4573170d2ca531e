"""What each variable does in kvrun, and where it does nothing (yet), with the reason.

Every registered variable has one :class:`Effect`: what reads it, or why nothing does.
Some act only on certain platforms (VLLM_CPU_KVCACHE_SPACE: cpu) or under certain
entry points (VLLM_API_KEY: ``kvrun serve``). An entry point calls
:func:`warn_ineffective` once it knows its platform: each variable the user set
explicitly that has no effect there is named in one warning, with the reason. The
same table gives `kvrun env` its effect column and docs/configuration.md its own.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from kvrun.envs import VARIABLES, EnvSnapshot

__all__ = ["EFFECTS", "ENTRY_POINTS", "Effect", "ineffective", "warn_ineffective"]

_logger = logging.getLogger("kvrun.envs")

# "serve": kvrun serve (its frontend and engine process); "offline": LLM() and
# `kvrun generate`; "bench": `kvrun bench serve`, the client.
ENTRY_POINTS = ("serve", "offline", "bench")


@dataclass(frozen=True)
class Effect:
    """Where a variable acts in kvrun, or why it does not."""

    reads: str  # what acts on it; "" when nothing in kvrun does yet
    why_not: str = ""  # nothing acts on it / it acts elsewhere: why (and what will)
    platforms: tuple[str, ...] = ()  # it acts only on these platforms; () = any
    entry_points: tuple[str, ...] = ()  # it acts only under these entry points; () = any

    @property
    def honoured(self) -> bool:
        return bool(self.reads)

    def describe(self) -> str:
        """One phrase for `kvrun env` and the docs."""
        if not self.honoured:
            return f"no effect yet: {self.why_not}"
        where = []
        if self.platforms:
            where.append("platform " + "/".join(self.platforms))
        if self.entry_points:
            where.append("kvrun " + "/".join(self.entry_points))
        return self.reads + (f" ({', '.join(where)} only)" if where else "")

    def why_not_here(self, platform: str, entry_point: str) -> str | None:
        """None when it acts on ``platform`` under ``entry_point``; else the reason."""
        if not self.honoured:
            return self.why_not
        if self.platforms and platform not in self.platforms:
            why = self.why_not or f"only the {'/'.join(self.platforms)} platform reads it"
            return f"the selected platform is {platform}: {why}"
        if self.entry_points and entry_point not in self.entry_points:
            shown = ", ".join(f"kvrun {e}" for e in self.entry_points)
            return f"it acts only under {shown} ({self.reads}), not here ({entry_point})"
        return None


def _acts(
    reads: str, *, platforms: tuple[str, ...] = (), entry: tuple[str, ...] = (), elsewhere: str = ""
) -> Effect:
    return Effect(reads, elsewhere, platforms, entry)


def _none(why: str) -> Effect:
    return Effect("", why)


_CPU = ("cpu",)
_GPU = ("cuda", "rocm")
_SERVE = ("serve",)
_DP_OFFLINE = "data parallelism is `kvrun serve -dp N`; the offline LLM runs one engine per process"
_S3 = "loading s3://bucket/prefix models"
_MOE_ALIGN_ELSEWHERE = (
    "only kvrun-cuda's Triton fused_moe has an alignment step; other platforms' fused_moe "
    "sort their tokens by expert in torch"
)
_BUILD = "the cpu plugin's native kernels (C, built on first use)"
_NO_BUILD_HERE = (
    "only kvrun-cpu compiles anything (its C kernels, on first use); kvrun-cuda's kernels "
    "are Triton, compiled on first launch"
)
_NO_CUDA_BUILD = (
    "kvrun builds no CUDA extension: kvrun-cuda's kernels are Triton, compiled on first "
    "launch; kvrun-cpu's are C (CMAKE_BUILD_TYPE, MAX_JOBS and VERBOSE apply)"
)

EFFECTS: dict[str, Effect] = {
    # install-time
    "MAX_JOBS": _acts(_BUILD, platforms=_CPU, elsewhere=_NO_BUILD_HERE),
    "NVCC_THREADS": _none(_NO_CUDA_BUILD),
    "VLLM_USE_PRECOMPILED": _none(_NO_CUDA_BUILD),
    "CMAKE_BUILD_TYPE": _acts(_BUILD, platforms=_CPU, elsewhere=_NO_BUILD_HERE),
    "VERBOSE": _acts(_BUILD, platforms=_CPU, elsewhere=_NO_BUILD_HERE),
    "VLLM_TARGET_DEVICE": _acts("platform selection"),
    # runtime
    "VLLM_CONFIG_ROOT": _acts("where usage-stats state lives"),
    "VLLM_CACHE_ROOT": _acts("compile, kernel and exported-model caches; usage records"),
    "VLLM_HOST_IP": _acts(
        "the address tensor/pipeline-parallel ranks meet at (the rendezvous; gloo uses the "
        "interface that holds it; unset: 127.0.0.1)"
    ),
    "VLLM_PORT": _acts(
        "the first port tried for the ranks' rendezvous, counting up to a free one "
        "(unset: any free port); the server's own port is --port"
    ),
    "VLLM_RPC_BASE_PATH": _acts("the frontend-engine IPC sockets", entry=_SERVE),
    "VLLM_USE_MODELSCOPE": _acts("model resolution"),
    "VLLM_RINGBUFFER_WARNING_INTERVAL": _acts(
        "the mp executor's warning (and the ray executor's, for the ranks on the engine's "
        "node), repeated at this interval, while a worker lags behind its shared-memory step "
        "broadcast"
    ),
    "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE": _none(
        "kvrun compiles each dense block on its own (enforce_eager=False), never the "
        "whole model as one graph"
    ),
    "LOCAL_RANK": _acts(
        "the GPU index; the mp executor sets it for each worker (its rank on this machine)",
        platforms=_GPU,
        elsewhere="the mp executor sets it for each worker; the cpu platform picks no device",
    ),
    "VLLM_ENGINE_ITERATION_TIMEOUT_S": _acts("the server's engine-hang detection", entry=_SERVE),
    "VLLM_API_KEY": _acts("the server's bearer-token check", entry=("serve", "bench")),
    "S3_ACCESS_KEY_ID": _acts(_S3 + " (unset: boto3's own credentials)"),
    "S3_SECRET_ACCESS_KEY": _acts(_S3 + " (unset: boto3's own credentials)"),
    "S3_ENDPOINT_URL": _acts(_S3 + " (an S3-compatible store; unset: AWS S3)"),
    "HF_HUB_OFFLINE": _acts("model resolution"),
    "VLLM_USAGE_STATS_SERVER": _acts("usage stats"),
    "VLLM_NO_USAGE_STATS": _acts("usage stats"),
    "DO_NOT_TRACK": _acts("usage stats"),
    "VLLM_DO_NOT_TRACK": _acts("usage stats"),
    "VLLM_USAGE_SOURCE": _acts("usage stats"),
    "VLLM_CONFIGURE_LOGGING": _acts("logging"),
    "VLLM_LOGGING_CONFIG_PATH": _acts("logging"),
    "VLLM_LOGGING_LEVEL": _acts("logging"),
    "VLLM_LOGGING_PREFIX": _acts("logging"),
    "VLLM_LOGITS_PROCESSOR_THREADS": _acts("the sampler's logits-processor threads"),
    "VLLM_TRACE_FUNCTION": _acts("logging (a call trace)"),
    "VLLM_ATTENTION_BACKEND": _acts("the attention backend choice"),
    "VLLM_PP_LAYER_PARTITION": _acts(
        "each pipeline stage's layer count (unset: even, the remainder to the earlier stages)"
    ),
    "VLLM_USE_RAY_SPMD_WORKER": _none(
        "kvrun's ray executor is always SPMD (every rank a Ray actor given each step "
        "directly, none in the engine process), which is what 1 asks; 0 (a rank in the "
        "engine process) is not built"
    ),
    "VLLM_USE_RAY_COMPILED_DAG": _acts(
        "the ray executor: 1 drives its actors through a Ray compiled graph (Ray's "
        "shared-memory channels on cpu, where every rank must be on the engine's node) "
        "instead of one actor call per rank and step"
    ),
    "VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL": _none(
        "kvrun's compiled graph carries only each step's message and the driver's logits "
        "between the engine and its actors (activations move by torch.distributed): no "
        "tensor passes between actors for an NCCL channel to carry"
    ),
    "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM": _acts(
        "the ray executor's compiled graph (VLLM_USE_RAY_COMPILED_DAG=1): overlaps its GPU "
        "communication with compute",
        platforms=_GPU,
    ),
    "VLLM_WORKER_MULTIPROC_METHOD": _acts(
        "how the mp executor starts its worker processes (fork turns to spawn, with a "
        "warning, once this process has run OpenMP threads, which a fork cannot carry)"
    ),
    "VLLM_ASSETS_CACHE": _acts("the server's cache of downloaded media", entry=_SERVE),
    "VLLM_IMAGE_FETCH_TIMEOUT": _acts("the server's image_url fetches", entry=_SERVE),
    "VLLM_VIDEO_FETCH_TIMEOUT": _acts("the server's video_url fetches", entry=_SERVE),
    "VLLM_AUDIO_FETCH_TIMEOUT": _acts(
        "the server's audio_url and input_audio fetches", entry=_SERVE
    ),
    "VLLM_MM_INPUT_CACHE_SIZE": _acts(
        "the engine's LRU of media encoder outputs (multimodal models), keyed by content hash"
    ),
    "VLLM_FUSED_MOE_CHUNK_SIZE": _acts(
        "the tokens per fused_moe call of a mixture-of-experts model (on every platform; "
        "on cuda/rocm it bounds the Triton kernel's per-call buffers)"
    ),
    "VLLM_NO_DEPRECATION_WARNING": _acts("logging"),
    "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": _acts("the server's engine-death policy", entry=_SERVE),
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": _acts("the max_model_len check"),
    "VLLM_TEST_FORCE_LOAD_FORMAT": _acts("the load format, when set (over load_format)"),
    "VLLM_RPC_TIMEOUT": _acts("the server's utility calls to the engine", entry=_SERVE),
    "VLLM_PLUGINS": _acts("plugin discovery"),
    "VLLM_TORCH_PROFILER_DIR": _acts("start_profile()/stop_profile() and /start_profile"),
    "VLLM_USE_TRITON_AWQ": _acts("AWQ dequantisation", platforms=_GPU),
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": _acts(
        "the server's /v1/load_lora_adapter and /v1/unload_lora_adapter routes", entry=_SERVE
    ),
    "VLLM_DISABLED_KERNELS": _acts("the platform's kernel choice", platforms=_GPU),
    "VLLM_USE_V1": _acts("1: kvrun's engine (its only one); 0 is refused"),
    "K_SCALE_CONSTANT": _acts("fp8 KV-cache scales", platforms=_GPU),
    "V_SCALE_CONSTANT": _acts("fp8 KV-cache scales", platforms=_GPU),
    "VLLM_ENABLE_V1_MULTIPROCESSING": _acts("the server's engine process", entry=_SERVE),
    "VLLM_LOG_BATCHSIZE_INTERVAL": _acts("the engine's batch log"),
    "VLLM_DISABLE_COMPILE_CACHE": _acts("torch.compile's cache"),
    "VLLM_SERVER_DEV_MODE": _acts("the server's development routes", entry=_SERVE),
    "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": _acts("the server's output batching", entry=_SERVE),
    "VLLM_MLA_DISABLE": _acts("DeepSeek-V2/V3's attention: every head cached, plain attention"),
    "VLLM_MLA_PERFORM_MATRIX_ABSORPTION": _acts(
        "DeepSeek-V2/V3's attention: W_UK/W_UV multiplied into q and o at load"
    ),
    "VLLM_MLA_DISABLE_REQUANTIZATION": _acts(
        "DeepSeek-V2/V3 from an fp8 checkpoint with W_UK/W_UV absorbed at load: the "
        "absorbed matrices are rounded back onto the fp8 block grid unless this is 1 (kept "
        "at full precision); no effect on other checkpoints or modes (a warning says so)"
    ),
    "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON": _acts(
        "fused_moe's alignment (tokens sorted by expert, each expert padded to the GEMM's "
        "tile) in Triton instead of torch ops",
        platforms=_GPU,
        elsewhere=_MOE_ALIGN_ELSEWHERE,
    ),
    "VLLM_RAY_PER_WORKER_GPUS": _acts(
        "the ray executor: GPUs each actor (rank) reserves, its placement-group bundle",
        platforms=_GPU,
        elsewhere="on cpu each actor reserves its torch threads as CPUs",
    ),
    "VLLM_RAY_BUNDLE_INDICES": _acts(
        "the ray executor: the placement-group bundle of each rank (unset: rank r on bundle r)"
    ),
    "VLLM_DP_RANK": _acts(
        "the data-parallel rank this `kvrun serve` runs (>= 1: a headless engine core)",
        entry=_SERVE,
        elsewhere=_DP_OFFLINE,
    ),
    "VLLM_DP_SIZE": _acts(
        "the data-parallel size (engine cores); must equal --data-parallel-size if both given",
        entry=_SERVE,
        elsewhere=_DP_OFFLINE,
    ),
    "VLLM_DP_MASTER_IP": _acts(
        "rank 0's address, where it listens for the other data-parallel ranks",
        entry=_SERVE,
        elsewhere=_DP_OFFLINE,
    ),
    "VLLM_DP_MASTER_PORT": _acts(
        "rank 0's port for the other data-parallel ranks (0: 29550)",
        entry=_SERVE,
        elsewhere=_DP_OFFLINE,
    ),
    "VLLM_CI_USE_S3": _acts("kvrun's test suite: test checkpoints come from S3, not built"),
    # cpu
    "VLLM_CPU_KVCACHE_SPACE": _acts("the KV-cache budget", platforms=_CPU),
    "VLLM_CPU_OMP_THREADS_BIND": _acts("thread binding", platforms=_CPU),
    # cuda / rocm
    "CUDA_HOME": _acts("finding CUDA libraries", platforms=_GPU),
    "VLLM_NCCL_SO_PATH": _acts("finding NCCL", platforms=_GPU),
    # The dynamic linker reads it whatever the platform.
    "LD_LIBRARY_PATH": _acts("the dynamic linker; kvrun-cuda's library search"),
    "VLLM_FLASH_ATTN_VERSION": _none(
        "kvrun-cuda has no FLASH_ATTN backend (its backends are TRITON_ATTN, FLASHINFER "
        "and the reference ones)"
    ),
    "CUDA_VISIBLE_DEVICES": _acts("which GPUs are visible", platforms=_GPU),
    "VLLM_USE_FLASHINFER_SAMPLER": _acts("the top-k/top-p kernel", platforms=("cuda",)),
    "VLLM_FLASHINFER_FORCE_TENSOR_CORES": _acts("FlashInfer decode", platforms=("cuda",)),
    "VLLM_TEST_FORCE_FP8_MARLIN": _acts("refused when 1 (no FP8 Marlin kernels)", platforms=_GPU),
    "VLLM_SKIP_P2P_CHECK": _acts(
        "the peer-to-peer check before cuda's custom all-reduce (tensor_parallel_size > 1)",
        platforms=("cuda",),
    ),
    "VLLM_CUDA_MEM_ALIGN_KV_CACHE": _acts(
        "the latent (MLA) KV cache's entries padded to 256 bytes", platforms=_GPU
    ),
    "VLLM_CUDART_SO_PATH": _acts("finding cudart", platforms=_GPU),
    "VLLM_USE_TRITON_FLASH_ATTN": _acts("the attention backend choice", platforms=("rocm",)),
    "VLLM_ROCM_FP8_PADDING": _none(
        "kvrun loads no fp8 weights yet, so there is nothing to pad "
        "(kvrun_rocm/fp8_padding.py pads them once an fp8-weight loader exists)"
    ),
    # openvino
    "VLLM_OPENVINO_DEVICE": _acts("the OpenVINO device", platforms=("openvino",)),
    "VLLM_OPENVINO_KVCACHE_SPACE": _acts("the KV-cache budget", platforms=("openvino",)),
    "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION": _acts("the KV precision", platforms=("openvino",)),
    "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS": _acts("int8 export", platforms=("openvino",)),
    # tpu
    "VLLM_XLA_CACHE_PATH": _acts("the XLA compilation cache", platforms=("tpu",)),
    "VLLM_XLA_CHECK_RECOMPILATION": _acts("the recompilation check", platforms=("tpu",)),
    # hpu
    "VLLM_CONTIGUOUS_PA": _acts("contiguous paged attention", platforms=("hpu",)),
}


def ineffective(
    env: EnvSnapshot,
    platform: str,
    entry_point: str,
    also_honoured: Collection[str] = (),
) -> list[tuple[str, str]]:
    """(name, why) for each variable set in the environment that does nothing here.

    ``also_honoured``: names the selected platform acts on beyond this table (a
    vendor's plugin that reads, say, VLLM_CPU_KVCACHE_SPACE).
    """
    assert entry_point in ENTRY_POINTS, entry_point
    found = []
    for var in VARIABLES:
        if env.source(var.name) != "environment" or var.name in also_honoured:
            continue
        why = EFFECTS[var.name].why_not_here(platform, entry_point)
        if why is not None:
            found.append((var.name, why))
    return found


def warn_ineffective(
    env: EnvSnapshot, platform: str, entry_point: str, also_honoured: Collection[str] = ()
) -> None:
    """One warning per variable set in the environment that has no effect here."""
    for name, why in ineffective(env, platform, entry_point, also_honoured):
        _logger.warning("%s is set but has no effect here: %s", name, why)
