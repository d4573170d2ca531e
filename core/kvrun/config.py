"""Engine options: what a user asks for (EngineArgs) and what the engine resolved (EngineConfig)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from kvrun.errors import ConfigError
from kvrun.pooling import CONVERTS, RUNNERS, PoolerConfig
from kvrun.quantization import check_quantization

__all__ = [
    "DTYPES",
    "EXECUTOR_BACKENDS",
    "KV_CACHE_DTYPES",
    "LOAD_FORMATS",
    "EngineArgs",
    "EngineConfig",
    "check_parallelism",
    "parse_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


# kv_cache_dtype names (vLLM's) other than "auto" (the model dtype); "fp8" means e4m3.
KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


# vLLM's load_format names kvrun reads (kvrun.loader.formats says what each one reads).
LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")


def parse_dtype(name: str) -> torch.dtype | None:
    """None for "auto" (the platform decides); a ConfigError for an unknown name."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not known; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class EngineArgs:
    """User options, named as in vLLM so existing code and command lines carry over."""

    model: str | None = None  # path, hub id or GGUF file; None = the default model
    tokenizer: str | None = None  # defaults to the model's own
    revision: str | None = None
    download_dir: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"  # auto picks what the platform runs fastest
    max_model_len: int | None = None  # defaults to the model's context length
    block_size: int | None = None  # tokens per KV block; None = the platform's default
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int | None = None  # tokens per step; default below
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None  # overrides the platform's KV budget (tests, tuning)
    attention_backend: str | None = None  # overrides VLLM_ATTENTION_BACKEND
    seed: int = 0
    max_logprobs: int = 20  # cap on logprobs / prompt_logprobs per position
    disable_log_stats: bool = False
    enforce_eager: bool = True  # False tries torch.compile and the platform's decode graphs
    gpu_memory_utilization: float = 0.9  # share of device memory a profiling platform may use
    kv_cache_dtype: str = "auto"  # "auto" = the model dtype, or a KV_CACHE_DTYPES name
    load_format: str = "auto"  # one of LOAD_FORMATS; "dummy" = random weights
    # Accepted as vLLM's flag, but no checkpoint code ever runs: it lets a config.json with
    # auto_map load when kvrun implements its architecture natively.
    trust_remote_code: bool = False
    # vLLM's StructuredOutputsConfig as a dict (or its JSON text): {"backend": "xgrammar"}.
    structured_outputs_config: dict[str, Any] | str | None = None
    # vLLM's pooling runner: "pooling" runs the model for embeddings and scores only
    # (generation refused); "generate" ("auto" for a causal LM) generates and serves
    # embeddings too. convert "embed" (what "auto" means under the pooling runner) turns
    # a causal LM into an embedding model; a *ForSequenceClassification is a classifier.
    runner: str = "auto"
    convert: str = "auto"
    pooler_config: dict[str, Any] | str | None = None  # {"pooling_type": ..., "normalize": ...}
    # LoRA adapters: with enable_lora, requests may name one (kvrun.lora.LoRARequest).
    enable_lora: bool = False
    max_loras: int = 1  # adapters in device slots, so distinct adapters running at once
    max_lora_rank: int = 16  # the highest adapter rank accepted
    max_cpu_loras: int | None = None  # adapters kept read in host memory; None = max_loras
    # A multimodal model's processor settings (vLLM's name; a dict or its JSON text), e.g.
    # Qwen2-VL's {"min_pixels": ..., "max_pixels": ...}; a prompt's own override them.
    mm_processor_kwargs: dict[str, Any] | str | None = None
    # Where offline LLM.chat's media content parts may come from (vLLM's names; the
    # server has the same flags): file:// URLs only inside allowed_local_media_path;
    # with allowed_media_domains, http(s) only from those hosts.
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    # vLLM's quantization names (kvrun.quantization): None dequantizes a quantized checkpoint
    # at load; "gguf" runs a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices as stored; "awq"
    # and "fp8" name such a checkpoint, dequantized at load as with None.
    quantization: str | None = None
    # Distributed execution (vLLM's ParallelConfig names): ranks splitting each layer and
    # the layer stack; the executor that runs them (None: "uni" for one rank, else "mp").
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # True: tensor-parallel ranks sum with the backend's all-reduce (NCCL) even where the
    # platform offers a faster one (cuda's over peer-to-peer memory: kvrun_cuda).
    disable_custom_all_reduce: bool = False
    # Whole engines serving one model (`kvrun serve -dp N`; kvrun.server.data_parallel).
    # An engine itself runs one rank: the offline LLM refuses more than 1.
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_parallelism(
            self.tensor_parallel_size,
            self.pipeline_parallel_size,
            self.distributed_executor_backend,
        )
        if not isinstance(self.data_parallel_size, int) or self.data_parallel_size < 1:
            raise ConfigError(
                f"data_parallel_size must be an integer >= 1, got {self.data_parallel_size!r}"
            )
        structured_outputs_backend(self.structured_outputs_config)
        for name, accepted in (("runner", RUNNERS), ("convert", CONVERTS)):
            if getattr(self, name) not in accepted:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not known; accepted: {', '.join(accepted)}"
                )
        resolve_pooler(self.pooler_config, PoolerConfig())
        if self.mm_processor_kwargs is not None:
            from kvrun.multimodal.processing import parse_processor_kwargs

            parse_processor_kwargs(self.mm_processor_kwargs)
        if self.allowed_local_media_path is not None:
            from kvrun.multimodal.fetch import check_allowed_local_path

            check_allowed_local_path(self.allowed_local_media_path)
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        for name in ("block_size", "max_model_len", "max_num_batched_tokens", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 when given, got {value}")
        if self.max_logprobs < 0:
            raise ConfigError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras={self.max_cpu_loras} is below max_loras={self.max_loras}; "
                "accepted: max_cpu_loras >= max_loras (adapters in slots are also kept in "
                "host memory), or unset"
            )
        parse_dtype(self.dtype)
        check_quantization(self.quantization)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} is out of range; "
                "accepted: 0 < value <= 1"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format {self.load_format!r} is not known; accepted: "
                f"{', '.join(LOAD_FORMATS)}"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not known; accepted: auto, "
                f"{', '.join(KV_CACHE_DTYPES)}"
            )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, *, model_positional: bool = False) -> None:
        """Add the engine options as --flags (vLLM's spellings)."""
        group = parser.add_argument_group("engine")
        if not model_positional:
            group.add_argument("--model", default=None, help="model path, hub id or GGUF file")
        group.add_argument("--tokenizer", default=None)
        group.add_argument("--revision", default=None)
        group.add_argument("--download-dir", default=None)
        group.add_argument("--served-model-name", default=None)
        group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
        group.add_argument("--max-model-len", type=int, default=None)
        group.add_argument(
            "--block-size", type=int, default=None, help="default: the platform's block size"
        )
        group.add_argument("--max-num-seqs", type=int, default=256)
        group.add_argument("--max-num-batched-tokens", type=int, default=None)
        group.add_argument(
            "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True
        )
        group.add_argument(
            "--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True
        )
        group.add_argument("--num-kv-blocks", type=int, default=None)
        group.add_argument("--attention-backend", default=None)
        group.add_argument("--seed", type=int, default=0)
        group.add_argument("--max-logprobs", type=int, default=20)
        group.add_argument("--disable-log-stats", action="store_true")
        group.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
        group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        group.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES])
        group.add_argument(
            "--quantization",
            "-q",
            default=None,
            help="gguf: run a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices as stored (default: "
            "dequantize at load); awq, fp8: an AWQ or fp8 checkpoint (dequantized at load)",
        )
        group.add_argument(
            "--load-format",
            default="auto",
            choices=LOAD_FORMATS,
            help="which weight files to read; dummy: random weights from config.json alone",
        )
        group.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="load a config.json with auto_map natively (kvrun never runs its code)",
        )
        group.add_argument(
            "--structured-outputs-config",
            default=None,
            metavar="JSON",
            help='structured output\'s settings as JSON, e.g. \'{"backend": "xgrammar"}\' '
            "(backends: auto, xgrammar, guidance)",
        )
        group.add_argument(
            "--runner",
            default="auto",
            choices=["auto", "generate", "pooling"],
            help="pooling: serve embeddings and scores (/v1/embeddings, /pooling, /score, "
            "/rerank) instead of generation",
        )
        group.add_argument(
            "--convert",
            default="auto",
            choices=["auto", "none", "embed", "classify"],
            help="how the pooling runner uses the model; auto/embed: a causal LM's last "
            "hidden state as its embedding",
        )
        group.add_argument(
            "--pooler-config",
            default=None,
            metavar="JSON",
            help='the pooling runner\'s pooler, e.g. \'{"pooling_type": "MEAN", '
            '"normalize": true}\' (pooling types LAST, MEAN, CLS)',
        )
        group.add_argument(
            "--enable-lora",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="serve LoRA adapters (PEFT format) next to the base model",
        )
        group.add_argument(
            "--max-loras",
            type=int,
            default=1,
            help="adapters held on the device at once (distinct adapters per step)",
        )
        group.add_argument(
            "--max-lora-rank", type=int, default=16, help="the highest adapter rank accepted"
        )
        group.add_argument(
            "--max-cpu-loras",
            type=int,
            default=None,
            help="adapters kept read in host memory (default: --max-loras)",
        )
        group.add_argument(
            "--mm-processor-kwargs",
            default=None,
            metavar="JSON",
            help="a multimodal model's processor settings, e.g. '{\"max_pixels\": 200704}' "
            "(Qwen2-VL: min_pixels, max_pixels); a request's own override them",
        )
        group.add_argument(
            "--tensor-parallel-size",
            "-tp",
            type=int,
            default=1,
            help="ranks that split each layer (tensor parallelism)",
        )
        group.add_argument(
            "--pipeline-parallel-size",
            "-pp",
            type=int,
            default=1,
            help="ranks that split the layer stack (pipeline parallelism)",
        )
        group.add_argument(
            "--distributed-executor-backend",
            default=None,
            help="how ranks run: uni (in this process; the default for one rank), "
            "mp (worker processes; the default for several), ray (Ray actors)",
        )
        group.add_argument(
            "--disable-custom-all-reduce",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="tensor-parallel ranks use the backend's all-reduce (NCCL) even where the "
            "platform has a faster one over peer-to-peer memory (cuda)",
        )
        group.add_argument(
            "--guided-decoding-backend",
            default=None,
            help="vLLM's older spelling of --structured-outputs-config '{\"backend\": NAME}'",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        values: dict[str, Any] = {
            f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)
        }
        backend = getattr(args, "guided_decoding_backend", None)
        if backend is not None:
            if values.get("structured_outputs_config") is not None:
                raise ConfigError(
                    "--guided-decoding-backend and --structured-outputs-config both set the "
                    "structured output backend; give one"
                )
            values["structured_outputs_config"] = {"backend": backend}
        return cls(**values)


# distributed_executor_backend values (vLLM's names) and what kvrun does with each.
EXECUTOR_BACKENDS = ("uni", "mp", "ray")


def check_parallelism(tp: int, pp: int, backend: str | None) -> str:
    """The executor backend for ``tp`` x ``pp`` ranks (``backend`` None: "uni" for one
    rank, "mp" for several); a ConfigError naming the bad value and what is accepted."""
    for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} is not valid; accepted: an integer >= 1")
    world = tp * pp
    if backend is None:
        return "uni" if world == 1 else "mp"
    if backend not in EXECUTOR_BACKENDS:
        raise ConfigError(
            f"distributed_executor_backend={backend!r} is not known; accepted: "
            f"{', '.join(EXECUTOR_BACKENDS)} (unset: uni for one rank, mp for several)"
        )
    if backend == "uni" and world > 1:
        raise ConfigError(
            f"distributed_executor_backend='uni' runs one rank in this process, but "
            f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {world}; "
            "accepted: mp (or unset) or ray for several ranks"
        )
    return backend


def json_object_option(
    name: str, value: dict[str, Any] | str | None, keys: Sequence[str], example: str
) -> dict[str, Any]:
    """An engine option given as a dict or its JSON text (vLLM's ``--x-config`` flags):
    the dict, with only ``keys``; a ConfigError naming what is wrong otherwise."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{name} {value!r} is not JSON ({exc}); accepted: an object such as {example}"
            ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"{name} {value!r} is not accepted; accepted: an object such as {example}"
        )
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ConfigError(
            f"{name} key {unknown[0]!r} is not acted on by kvrun; accepted keys: {', '.join(keys)}"
        )
    return value


def structured_outputs_backend(config: dict[str, Any] | str | None) -> str:
    """The backend a structured_outputs_config names ("xgrammar"); a ConfigError naming
    what is wrong with it otherwise."""
    from kvrun.structured_output.compiler import resolve_backend

    options = json_object_option(
        "structured_outputs_config", config, ("backend",), '{"backend": "xgrammar"}'
    )
    return resolve_backend(options.get("backend"))


def resolve_pooler(value: dict[str, Any] | str | None, default: PoolerConfig) -> PoolerConfig:
    """The pooler a pooler_config asks for, over ``default``."""
    options = json_object_option(
        "pooler_config",
        value,
        ("pooling_type", "normalize"),
        '{"pooling_type": "MEAN", "normalize": true}',
    )
    return default.with_options(options)


@dataclass(frozen=True)
class EngineConfig:
    """What the engine resolved from EngineArgs, the model and the platform."""

    model_source: str  # what was loaded: path or hub id
    model_name: str  # the name the server reports (served_model_name or model_source)
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    seed: int
    max_logprobs: int
    platform_name: str
    attention_backend: str  # the backend's name as VLLM_ATTENTION_BACKEND spells it
    num_kv_blocks: int = 0  # filled once the cache is planned: blocks the scheduler hands out
    kv_cache_bytes: int = 0
    kv_cache_dtype: torch.dtype | None = None  # the KV cache's dtype; None = ``dtype``
    enforce_eager: bool = True  # False: torch.compile and the platform's decode graphs
    gpu_memory_utilization: float = 0.9  # share of device memory a profiling platform may use
    # How model_source's weights are read (VLLM_TEST_FORCE_LOAD_FORMAT applied), and
    # whether an auto_map config.json may load natively: for executors that load it again.
    load_format: str = "auto"
    trust_remote_code: bool = False
    structured_outputs_backend: str = "xgrammar"  # compiles requests' output constraints
    runner: str = "generate"  # "generate" or "pooling" (embeddings and scores)
    pooler: PoolerConfig | None = None  # how pooling requests pool (None: none are served)
    convert: str = "none"  # the pooling runner's task: "embed" or "classify"
    id2label: tuple[str, ...] = ()  # a classifier's labels, by class index
    hidden_size: int = 0  # the model's hidden size: an embedding's length
    matryoshka: tuple[int, ...] | bool = False  # embeddings may be cut (ModelConfig's)
    enable_lora: bool = False  # requests may run with a LoRA adapter
    max_loras: int = 0  # device slots for adapters (0 without enable_lora)
    max_lora_rank: int = 0  # the highest adapter rank accepted
    max_cpu_loras: int = 0  # adapters kept read in host memory
    quantization: str | None = None  # EngineArgs.quantization, checked
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"  # "uni" (in-process) or "mp" (workers)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype the KV cache is stored in."""
        return self.kv_cache_dtype or self.dtype
