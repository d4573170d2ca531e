"""The VLLM_* variables: one typed entry each, read once into a frozen snapshot.

This is the only module that reads ``os.environ``, and only when :func:`read_env`,
:func:`unknown_variables` or :func:`warn_unknown_variables` is called without a
mapping; entry points do that once and pass the snapshot down. Names, defaults and
meanings follow vLLM; where vLLM's parsing misreads what a user meant we accept what
was meant, and docs/configuration.md lists each such difference.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import re
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from kvrun import env_parsers as p
from kvrun.errors import ConfigError

__all__ = [
    "GROUPS",
    "LOGGING_LEVELS",
    "PROCESS_DEFAULTS",
    "VARIABLES",
    "EnvSnapshot",
    "EnvVar",
    "Source",
    "apply_process_defaults",
    "read_env",
    "unknown_variables",
    "warn_unknown_variables",
]

T = TypeVar("T")
Source = Literal["environment", "default"]

# The order `kvrun env` and the docs show groups in.
GROUPS = ("install-time", "runtime", "cpu", "cuda", "rocm", "openvino", "tpu", "hpu")
LOGGING_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_META = "kvrun.envs"


@dataclass(frozen=True)
class _Computed(Generic[T]):
    """A default that depends on other variables (read earlier) or on the environ."""

    compute: Callable[[Mapping[str, str], Mapping[str, Any]], T]  # (environ, values so far)
    text: str  # how the docs describe it


@dataclass(frozen=True)
class EnvVar:
    """One variable: its name, how it parses, its default and what it is for."""

    name: str
    parser: p.Parser[Any]
    default: Any  # the value when unset; for computed defaults see default_text
    computed: _Computed[Any] | None  # set when the default depends on other values
    doc: str  # one line: what the variable does in kvrun
    group: str  # one of GROUPS
    secret: bool = False  # `kvrun env` hides the value

    @property
    def type(self) -> str:
        """A short human type: "bool", "int", "float", "str", "path", "list[int]", ..."""
        return self.parser.type_name

    @property
    def accepted(self) -> str:
        return self.parser.accepted

    @property
    def default_text(self) -> str:
        """The default as the docs show it, in the variable's own spelling (1/0, a,b)."""
        value = self.default
        if self.computed is not None:
            return self.computed.text
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "empty"
        return str(value) or "empty"


def _var(
    parser: p.Parser[T], default: T | _Computed[T], group: str, doc: str, *, secret: bool = False
) -> T:
    computed = default if isinstance(default, _Computed) else None
    static = None if computed is not None else default
    spec = EnvVar("", parser, static, computed, doc, group, secret)
    # Secrets stay out of the snapshot's repr, which ends up in logs and tracebacks.
    return cast(T, field(metadata={_META: spec}, repr=not secret))


def _opt(parser: p.Parser[T], group: str, doc: str, *, secret: bool = False) -> T | None:
    """A variable whose default is "unset" (None)."""
    return _var(cast("p.Parser[T | None]", parser), None, group, doc, secret=secret)


def _config_root(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(p.home(environ), ".config")
    return os.path.join(base, "kvrun")


def _cache_root(environ: Mapping[str, str], values: Mapping[str, Any]) -> str:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(p.home(environ), ".cache")
    return os.path.join(base, "kvrun")


def _under_cache(name: str) -> _Computed[str]:
    return _Computed(
        lambda environ, values: os.path.join(values["VLLM_CACHE_ROOT"], name),
        f"$VLLM_CACHE_ROOT/{name}",
    )


_INSTALL, _RUN, _CPU, _CUDA, _ROCM, _OV, _TPU, _HPU = GROUPS
_CONFIG_ROOT = _Computed(_config_root, "$XDG_CONFIG_HOME/kvrun, else ~/.config/kvrun")
_CACHE_ROOT = _Computed(_cache_root, "$XDG_CACHE_HOME/kvrun, else ~/.cache/kvrun")
_TMPDIR = _Computed(lambda e, v: tempfile.gettempdir(), "the system temporary directory")
_FOLLOW_DNT = _Computed(lambda e, v: bool(v["DO_NOT_TRACK"]), "the value of DO_NOT_TRACK")
_BUILD_TYPES = ("Debug", "Release", "RelWithDebInfo")
_SECONDS = p.integer(1, unit="seconds")
_MILLIS = p.integer(1, unit="milliseconds")
_GIB = p.number(0, unit="GiB")  # a float is our extension: vLLM takes whole GiB
_BUNDLES = p.int_list(0, distinct=True)
_OV_PRECISION = p.choice(("u8", "f16", "bf16", "f32"), fold=str.lower)


@dataclass(frozen=True, kw_only=True)
class EnvSnapshot:
    """Every variable's value, read once. Fields are in dependency order: a computed
    default only reads fields above it."""

    # _var/_opt return a dataclasses.Field (no default), so RUF009's shared-mutable-
    # default worry does not apply; read_env copies defaults per snapshot.

    # ---------------------------------------------------------------- install-time
    MAX_JOBS: int | None = _opt(
        p.integer(1), _INSTALL, "Parallel compile jobs for native extensions; unset: the CPU count."
    )
    NVCC_THREADS: int | None = _opt(
        p.integer(1), _INSTALL, "Threads per nvcc process; MAX_JOBS is lowered to compensate."
    )
    VLLM_USE_PRECOMPILED: bool = _var(
        p.BOOL, False, _INSTALL, "Install prebuilt native binaries instead of compiling them."
    )
    CMAKE_BUILD_TYPE: str | None = _opt(
        p.choice(_BUILD_TYPES), _INSTALL, "CMake build type for native extensions."
    )
    VERBOSE: bool = _var(p.BOOL, False, _INSTALL, "Print verbose output while building.")
    VLLM_CONFIG_ROOT: str = _var(
        p.PATH, _CONFIG_ROOT, _INSTALL, "Directory for kvrun's configuration and usage records."
    )
    # ---------------------------------------------------------------- runtime
    VLLM_TARGET_DEVICE: str | None = _opt(
        p.DEVICE, _RUN, "Platform plugin to run on; unset: best available accelerator, else cpu."
    )
    VLLM_CACHE_ROOT: str = _var(
        p.PATH, _CACHE_ROOT, _RUN, "Directory for kvrun's caches (assets, compiled graphs, traces)."
    )
    VLLM_HOST_IP: str = _var(
        p.STR, "", _RUN, "This node's IP for distributed traffic (not the API server's)."
    )
    VLLM_PORT: int | None = _opt(
        p.PORT, _RUN, "First port for internal distributed communication; more ports count up."
    )
    VLLM_RPC_BASE_PATH: str = _var(
        p.PATH, _TMPDIR, _RUN, "Directory for the ipc:// sockets between API server and engine."
    )
    VLLM_USE_MODELSCOPE: bool = _var(
        p.BOOL, False, _RUN, "Download models from ModelScope instead of the Hugging Face Hub."
    )
    VLLM_RINGBUFFER_WARNING_INTERVAL: int = _var(
        _SECONDS, 60, _RUN, "Seconds between warnings that the ring buffer is full."
    )
    VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE: bool = _var(
        p.BOOL, True, _RUN, "Ask torch.compile for one whole graph (testing flag)."
    )
    LOCAL_RANK: int = _var(
        p.integer(0), 0, _RUN, "This process's rank on its node; picks its device index."
    )
    VLLM_ENGINE_ITERATION_TIMEOUT_S: int = _var(
        _SECONDS, 60, _RUN, "Seconds an engine step may take before it counts as hung."
    )
    VLLM_API_KEY: str | None = _opt(
        p.OPT_STR,
        _RUN,
        "Bearer key the API server requires (not on /health, /ping, /version).",
        secret=True,
    )
    S3_ACCESS_KEY_ID: str | None = _opt(
        p.OPT_STR, _RUN, "S3 access key id for loading models from S3.", secret=True
    )
    S3_SECRET_ACCESS_KEY: str | None = _opt(
        p.OPT_STR, _RUN, "S3 secret key for loading models from S3.", secret=True
    )
    S3_ENDPOINT_URL: str | None = _opt(
        p.OPT_STR, _RUN, "S3 endpoint for loading models from S3-compatible storage."
    )
    HF_HUB_OFFLINE: bool = _var(
        p.BOOL, False, _RUN, "Load models only from the local Hugging Face cache, never the hub."
    )
    VLLM_USAGE_STATS_SERVER: str = _var(
        p.URL,
        "https://stats.vllm.ai",
        _RUN,
        "Where usage records go; sent only when set explicitly.",
    )
    VLLM_NO_USAGE_STATS: bool = _var(p.BOOL, False, _RUN, "Record no usage statistics at all.")
    DO_NOT_TRACK: bool = _var(
        p.BOOL, False, _RUN, "The cross-tool opt-out: record no usage statistics."
    )
    VLLM_DO_NOT_TRACK: bool = _var(
        p.BOOL, _FOLLOW_DNT, _RUN, "Record no usage statistics (vLLM's DO_NOT_TRACK)."
    )
    VLLM_USAGE_SOURCE: str = _var(
        p.STR, "production", _RUN, "Label stored in usage records: how kvrun was started."
    )
    VLLM_CONFIGURE_LOGGING: bool = _var(
        p.BOOL, True, _RUN, "Let kvrun configure its 'kvrun' logger; 0 leaves logging alone."
    )
    VLLM_LOGGING_CONFIG_PATH: str | None = _opt(
        p.JSON_FILE, _RUN, "JSON logging.config.dictConfig file applied instead of kvrun's default."
    )
    VLLM_LOGGING_LEVEL: str = _var(
        p.choice(LOGGING_LEVELS, fold=str.upper), "INFO", _RUN, "Level of the 'kvrun' logger."
    )
    VLLM_LOGGING_PREFIX: str = _var(
        p.STR, "", _RUN, "Text put before every message of the 'kvrun' loggers."
    )
    VLLM_LOGITS_PROCESSOR_THREADS: int | None = _opt(
        p.integer(1), _RUN, "Run logits processors in a thread pool of this size; unset: inline."
    )
    VLLM_TRACE_FUNCTION: bool = _var(
        p.BOOL, False, _RUN, "Trace every kvrun function call to a file under the cache root."
    )
    VLLM_ATTENTION_BACKEND: str | None = _opt(
        p.OPT_STR, _RUN, "Attention backend by name; unset: the platform's default."
    )
    VLLM_PP_LAYER_PARTITION: list[int] | None = _opt(  # noqa: RUF009
        p.int_list(1), _RUN, "Layers per pipeline stage, e.g. 12,12,8; unset: split evenly."
    )
    VLLM_USE_RAY_SPMD_WORKER: bool = _var(
        p.BOOL, False, _RUN, "Run every Ray worker as its own process, driven like the others."
    )
    VLLM_USE_RAY_COMPILED_DAG: bool = _var(
        p.BOOL, False, _RUN, "Drive Ray workers through Ray's compiled-graph API."
    )
    VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL: bool = _var(
        p.BOOL, True, _RUN, "Use NCCL channels inside Ray's compiled graph."
    )
    VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM: bool = _var(
        p.BOOL, False, _RUN, "Overlap communication with compute in Ray's compiled graph."
    )
    VLLM_WORKER_MULTIPROC_METHOD: str = _var(
        p.choice(("fork", "spawn")), "fork", _RUN, "How worker processes are started."
    )
    VLLM_ASSETS_CACHE: str = _var(
        p.PATH, _under_cache("assets"), _RUN, "Directory for downloaded test and example assets."
    )
    VLLM_IMAGE_FETCH_TIMEOUT: int = _var(
        _SECONDS, 5, _RUN, "Seconds to wait when fetching an image."
    )
    VLLM_VIDEO_FETCH_TIMEOUT: int = _var(
        _SECONDS, 30, _RUN, "Seconds to wait when fetching a video."
    )
    VLLM_AUDIO_FETCH_TIMEOUT: int = _var(_SECONDS, 10, _RUN, "Seconds to wait when fetching audio.")
    VLLM_MM_INPUT_CACHE_SIZE: int = _var(
        p.integer(0), 256, _RUN, "Multimodal items (images, videos, clips) kept in the input cache."
    )
    VLLM_FUSED_MOE_CHUNK_SIZE: int = _var(
        p.integer(1), 32768, _RUN, "Tokens per chunk in the fused mixture-of-experts kernel."
    )
    VLLM_NO_DEPRECATION_WARNING: bool = _var(
        p.BOOL, False, _RUN, "Silence kvrun's deprecation warnings."
    )
    VLLM_KEEP_ALIVE_ON_ENGINE_DEATH: bool = _var(
        p.BOOL, False, _RUN, "Keep the API server up after the engine has died."
    )
    VLLM_ALLOW_LONG_MAX_MODEL_LEN: bool = _var(
        p.BOOL, False, _RUN, "Allow max_model_len above what the model's config.json derives."
    )
    VLLM_TEST_FORCE_LOAD_FORMAT: str = _var(
        p.STR, "dummy", _RUN, "Load format that replaces load_format, only when set (tests)."
    )
    VLLM_RPC_TIMEOUT: int = _var(
        _MILLIS, 10000, _RUN, "Milliseconds to wait for the engine to answer an RPC."
    )
    VLLM_PLUGINS: list[str] | None = _opt(  # noqa: RUF009
        p.STR_LIST, _RUN, "Plugins to load by entry-point name; unset: all, empty: none."
    )
    VLLM_TORCH_PROFILER_DIR: str | None = _opt(
        p.ABS_PATH, _RUN, "Enable the torch profiler and write traces to this directory."
    )
    VLLM_USE_TRITON_AWQ: bool = _var(
        p.BOOL, False, _RUN, "Use the Triton implementation of AWQ kernels."
    )
    VLLM_ALLOW_RUNTIME_LORA_UPDATING: bool = _var(
        p.BOOL, False, _RUN, "Allow loading and unloading LoRA adapters while serving."
    )
    VLLM_DISABLED_KERNELS: list[str] = _var(  # noqa: RUF009
        p.STR_LIST, [], _RUN, "Quantization kernels never to pick, by class name (testing)."
    )
    VLLM_USE_V1: bool = _var(
        p.BOOL, False, _RUN, "vLLM's V1 engine: kvrun's only one; 0 set explicitly is refused."
    )
    K_SCALE_CONSTANT: int = _var(
        p.integer(1), 200, _RUN, "Divisor for the dynamic key scale of an fp8 KV cache."
    )
    V_SCALE_CONSTANT: int = _var(
        p.integer(1), 100, _RUN, "Divisor for the dynamic value scale of an fp8 KV cache."
    )
    VLLM_ENABLE_V1_MULTIPROCESSING: bool = _var(
        p.BOOL, True, _RUN, "Run the engine core in its own process under the offline LLM API."
    )
    VLLM_LOG_BATCHSIZE_INTERVAL: float = _var(
        p.number(unit="seconds"), -1.0, _RUN, "Seconds between batch-size logs; negative: never."
    )
    VLLM_DISABLE_COMPILE_CACHE: bool = _var(
        p.BOOL, False, _RUN, "Do not reuse cached torch.compile results."
    )
    VLLM_SERVER_DEV_MODE: bool = _var(
        p.BOOL, False, _RUN, "Expose development endpoints such as /reset_prefix_cache."
    )
    VLLM_V1_OUTPUT_PROC_CHUNK_SIZE: int = _var(
        p.integer(1), 128, _RUN, "Outputs handled per asyncio task when streaming many requests."
    )
    VLLM_MLA_DISABLE: bool = _var(
        p.BOOL, False, _RUN, "Turn off the multi-head latent attention optimisations."
    )
    VLLM_MLA_PERFORM_MATRIX_ABSORPTION: bool = _var(
        p.BOOL, True, _RUN, "Absorb MLA up-projections into Q and O for decode."
    )
    VLLM_MLA_DISABLE_REQUANTIZATION: bool = _var(
        p.BOOL, False, _RUN, "Keep absorbed MLA matrices in activation dtype instead of fp8."
    )
    VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON: bool = _var(
        p.BOOL, False, _RUN, "Use the Triton version of the MoE block-size alignment."
    )
    VLLM_RAY_PER_WORKER_GPUS: float = _var(
        p.number(0, above=True), 1.0, _RUN, "GPUs Ray reserves per worker; fractions share a GPU."
    )
    VLLM_RAY_BUNDLE_INDICES: list[int] = _var(  # noqa: RUF009
        _BUNDLES, [], _RUN, "Ray placement-group bundle per worker, e.g. 0,1,2,3."
    )
    VLLM_DP_RANK: int = _var(p.integer(0), 0, _RUN, "This process's data-parallel rank.")
    VLLM_DP_SIZE: int = _var(p.integer(1), 1, _RUN, "Data-parallel world size.")
    VLLM_DP_MASTER_IP: str = _var(
        p.STR, "", _RUN, "IP of the data-parallel master node (rank 0); empty: 127.0.0.1."
    )
    VLLM_DP_MASTER_PORT: int = _var(
        p.integer(0, 65535), 0, _RUN, "Port of the data-parallel master node; 0: 29550."
    )
    VLLM_CI_USE_S3: bool = _var(p.BOOL, False, _RUN, "Load test models from S3 (our CI only).")
    # ---------------------------------------------------------------- cpu
    VLLM_CPU_KVCACHE_SPACE: float = _var(
        _GIB, 0, _CPU, "GiB for the KV cache on cpu; 0: the default (4 GiB)."
    )
    VLLM_CPU_OMP_THREADS_BIND: str = _var(
        p.CPU_LIST, "all", _CPU, "CPU cores OpenMP threads are pinned to; ranks split by '|'."
    )
    # ---------------------------------------------------------------- cuda
    CUDA_HOME: str | None = _opt(
        p.PATH, _CUDA, "CUDA toolkit directory (holding bin, include, lib)."
    )
    VLLM_NCCL_SO_PATH: str | None = _opt(
        p.PATH, _CUDA, "NCCL library to load instead of the one found on LD_LIBRARY_PATH."
    )
    LD_LIBRARY_PATH: str | None = _opt(
        p.STR, _CUDA, "Where the NCCL library is searched for when VLLM_NCCL_SO_PATH is unset."
    )
    VLLM_FLASH_ATTN_VERSION: int | None = _opt(
        p.integer(2, 3), _CUDA, "Force FlashAttention 2 or 3 in the flash-attention backend."
    )
    CUDA_VISIBLE_DEVICES: str | None = _opt(p.STR, _CUDA, "GPUs this process may use.")
    VLLM_USE_FLASHINFER_SAMPLER: bool | None = _opt(
        p.BOOL, _CUDA, "Use FlashInfer's sampler; unset: when available."
    )
    VLLM_FLASHINFER_FORCE_TENSOR_CORES: bool = _var(
        p.BOOL, False, _CUDA, "Force FlashInfer to use tensor cores for decode."
    )
    VLLM_TEST_FORCE_FP8_MARLIN: bool = _var(
        p.BOOL, False, _CUDA, "Use FP8 Marlin kernels even where fp8 compute is native."
    )
    VLLM_SKIP_P2P_CHECK: bool = _var(
        p.BOOL, False, _CUDA, "Trust the driver's peer-to-peer report instead of testing it."
    )
    VLLM_CUDA_MEM_ALIGN_KV_CACHE: bool = _var(
        p.BOOL, True, _CUDA, "Align KV-cache entries to 256 bytes (affects MLA)."
    )
    VLLM_CUDART_SO_PATH: str | None = _opt(
        p.PATH, _CUDA, "CUDA runtime library to use where it cannot be found automatically."
    )
    # ---------------------------------------------------------------- rocm
    VLLM_USE_TRITON_FLASH_ATTN: bool = _var(
        p.BOOL, True, _ROCM, "Use the Triton flash-attention kernels."
    )
    VLLM_ROCM_FP8_PADDING: bool = _var(p.BOOL, True, _ROCM, "Pad fp8 weights to 256 bytes.")
    # ---------------------------------------------------------------- openvino
    VLLM_OPENVINO_DEVICE: str = _var(
        p.choice(("CPU", "GPU"), fold=str.upper), "CPU", _OV, "OpenVINO device to run on."
    )
    VLLM_OPENVINO_KVCACHE_SPACE: int = _var(
        p.integer(0, unit="GiB"), 0, _OV, "GiB for the OpenVINO KV cache; 0: the default."
    )
    VLLM_OPENVINO_CPU_KV_CACHE_PRECISION: str | None = _opt(
        _OV_PRECISION, _OV, "KV-cache precision on OpenVINO CPU; u8 compresses."
    )
    VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS: bool = _var(
        p.BOOL, False, _OV, "Compress weights while exporting the model to OpenVINO."
    )
    # ---------------------------------------------------------------- tpu
    VLLM_XLA_CACHE_PATH: str = _var(
        p.PATH, _under_cache("xla_cache"), _TPU, "Directory for XLA's persistent compilation cache."
    )
    # Beyond the seed list: vLLM's TPU worker reads it too, and kvrun-tpu honours it.
    VLLM_XLA_CHECK_RECOMPILATION: bool = _var(
        p.BOOL, False, _TPU, "Fail a step that compiles a new XLA graph after warm-up."
    )
    # ---------------------------------------------------------------- hpu
    VLLM_CONTIGUOUS_PA: bool = _var(
        p.BOOL, True, _HPU, "Fetch the HPU KV cache contiguously (Gaudi3)."
    )

    # what was read: the registered names present in the environment, as text
    _raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # each variable's default for this environment (computed defaults resolved)
    _defaults: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def source(self, name: str) -> Source:
        """ "environment" when the value was read from the variable, else "default"."""
        var = _lookup(name)
        text = self._raw.get(name)
        if text is None or (var.parser.empty_is_unset and not text.strip()):
            return "default"
        return "environment"

    def raw(self, name: str) -> str | None:
        """The variable's text as found in the environment; None when unset."""
        _lookup(name)
        return self._raw.get(name)

    def default(self, name: str) -> Any:
        """The value the variable has when unset, in this environment."""
        _lookup(name)
        return self._defaults[name]

    def items(self) -> Iterator[tuple[EnvVar, Any, Source]]:
        """(variable, value, source) for every variable, in registry order."""
        for var in VARIABLES:
            yield var, getattr(self, var.name), self.source(var.name)


VARIABLES: tuple[EnvVar, ...] = tuple(
    dataclasses.replace(f.metadata[_META], name=f.name)
    for f in dataclasses.fields(EnvSnapshot)
    if _META in f.metadata
)
_BY_NAME: Mapping[str, EnvVar] = types.MappingProxyType({v.name: v for v in VARIABLES})
# What Kubernetes injects for a Service named `vllm`; see the VLLM_PORT error.
_K8S = re.compile(r"VLLM_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)")
_logger = logging.getLogger("kvrun.envs")


def _lookup(name: str) -> EnvVar:
    var = _BY_NAME.get(name)
    if var is None:
        raise KeyError(f"{name} is not a registered variable")
    return var


def read_env(environ: Mapping[str, str] | None = None) -> EnvSnapshot:
    """Read every variable from ``environ`` (``os.environ`` when None) into a snapshot.

    Raises :class:`kvrun.errors.ConfigError` for the first bad value, naming the
    variable, the value and what is accepted.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    raw: dict[str, str] = {}
    for var in VARIABLES:
        if var.computed is not None:
            default = var.computed.compute(env, values)
        else:
            default = copy.deepcopy(var.default)  # never share a mutable default
        defaults[var.name] = default
        text = env.get(var.name)
        if text is not None:
            raw[var.name] = text
        if text is None or (var.parser.empty_is_unset and not text.strip()):
            values[var.name] = default
        else:
            values[var.name] = var.parser.parse(var.name, text, env)
    if "VLLM_USE_V1" in raw and not values["VLLM_USE_V1"]:
        raise ConfigError(
            f"VLLM_USE_V1={raw['VLLM_USE_V1']} asks for vLLM's V0 engine, which kvrun does not "
            "have: kvrun has one engine, shaped like vLLM's V1 (chunked prefill and prefix "
            "caching in one scheduler); unset VLLM_USE_V1 or set it to 1"
        )
    return EnvSnapshot(**values, _raw=raw, _defaults=defaults)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Every ``VLLM_*`` name that is not a known variable, with the closest known name."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    known = list(_BY_NAME)
    found: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if not name.startswith("VLLM_") or name in _BY_NAME:
            continue
        # 0.8: below that, every VLLM_* name looks "close" because of the shared prefix.
        close = None if _K8S.fullmatch(name) else difflib.get_close_matches(name, known, 1, 0.8)
        found.append((name, close[0] if close else None))
    return found


def warn_unknown_variables(environ: Mapping[str, str] | None = None) -> None:
    """Log one warning per unknown ``VLLM_*`` name on the "kvrun.envs" logger."""
    for name, close in unknown_variables(environ):
        if close is not None:
            _logger.warning("unknown variable %s; did you mean %s?", name, close)
        elif _K8S.fullmatch(name):
            _logger.warning(
                "unknown variable %s; Kubernetes sets it for a Service named `vllm`, "
                "which also overrides VLLM_PORT: rename the Service",
                name,
            )
        else:
            _logger.warning("unknown variable %s; `kvrun env` lists the known ones", name)


# Library variables kvrun's own processes (the `kvrun` command and the engine process
# it spawns) get when the user has not set them. OpenMP reads them when torch loads,
# so they are applied before anything imports torch. PASSIVE: an OpenMP thread that
# finishes early sleeps instead of spinning; with the default spinning, small matmuls
# stall whenever another process (the HTTP frontend, a second job) holds one of the
# cores (NOTES.md has the measurements).
PROCESS_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_process_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set each PROCESS_DEFAULTS name the environment lacks; returns what was set."""
    env = cast(dict[str, str], os.environ) if environ is None else environ
    applied = {k: v for k, v in PROCESS_DEFAULTS.items() if k not in env}
    env.update(applied)
    return applied
