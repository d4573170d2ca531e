"""Building an engine: configuration resolved once, then platform, model, KV cache, step
runner and scheduler, each choice logged with why.

:func:`resolve_engine_config` turns the user's EngineArgs, the environment snapshot,
the platform and the checkpoint's ModelConfig into the frozen EngineConfig;
:func:`build_engine_parts` builds everything the engine loop needs from it, every part
complete when built (nothing is attached to a runner later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, with_latent_cache
from kvrun.config import (
    EngineArgs,
    EngineConfig,
    check_parallelism,
    parse_dtype,
    resolve_pooler,
    structured_outputs_backend,
)
from kvrun.engine.compilation import CompileSettings, compile_function, compile_settings
from kvrun.engine.executor_runner import ExecutorRunner
from kvrun.engine.model_runner import ModelRunner
from kvrun.engine.profile_run import make_profile_run
from kvrun.engine.step_runner import CausalLM, StepRunner, concurrent_batches
from kvrun.env_effects import warn_ineffective
from kvrun.envs import EnvSnapshot
from kvrun.errors import ConfigError
from kvrun.loader import DEFAULT_HUB_MODEL, engine_load_format, load_engine_checkpoint
from kvrun.loader.checkpoint import Checkpoint
from kvrun.models.config import ModelConfig
from kvrun.models.llama import every_layer_window
from kvrun.models.registry import ModelRegistry
from kvrun.ops import reference, reference_ops
from kvrun.platforms import KVCachePlan, KVCacheRequest, Platform, plan_exact_kv_blocks
from kvrun.plugins import create_platform, load_general_plugins
from kvrun.pooling import PoolerConfig
from kvrun.quantization import plan_quantized_load
from kvrun.sampling.truncation import TopKTopPSampler
from kvrun.scheduling.capacity import require_blocks
from kvrun.scheduling.scheduler import Scheduler, SchedulerConfig
from kvrun.tokenizer import Tokenizer, load_tokenizer
from kvrun.usage import record_usage

if TYPE_CHECKING:
    from kvrun.lora.manager import LoraManager
    from kvrun.lora.slots import ExecutorLoras
    from kvrun.multimodal.processing import MultiModalProcessor

__all__ = [
    "EngineParts",
    "ResolvedConfig",
    "build_engine_parts",
    "kv_cache_request",
    "load_model_source",
    "resolve_engine_config",
    "resolve_lora",
    "resolve_max_model_len",
]

logger = logging.getLogger(__name__)

GiB = float(1 << 30)
# Per-step token budget with chunked prefill: large enough to keep matmuls efficient,
# small enough that a long prompt does not stall running decodes for long.
DEFAULT_CHUNKED_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class EngineParts:
    """Everything the engine loop runs on; LLMEngine(parts, env) takes them as they are."""

    platform: Platform
    config: EngineConfig
    tokenizer: Tokenizer
    scheduler: Scheduler
    runner: StepRunner
    # Platform.top_k_top_p_sampler(): the platform's sampling kernel for the Sampler.
    top_k_top_p: TopKTopPSampler | None = None
    # The op table's apply_token_bitmask (structured output's mask, in the sampler).
    apply_token_bitmask: Callable[..., None] = reference.apply_token_bitmask
    # LoRA adapters' host cache and device slots (enable_lora), shared with the runner;
    # with the mp/ray executor the engine's side of them (the ranks hold the slots).
    lora: LoraManager | ExecutorLoras | None = None
    # A multimodal model's media processing (prompts with multi_modal_data); None = text.
    multimodal: MultiModalProcessor | None = None
    # The op table's argmax (greedy rows' picks, in the sampler).
    argmax: Callable[[torch.Tensor], torch.Tensor] = reference.argmax


@dataclass(frozen=True)
class ResolvedConfig:
    """The engine's configuration and the attention backend it names, with the reasons
    the start-up log gives for the choices that were not asked for."""

    config: EngineConfig  # after the platform's check_config
    attention: AttentionBackend
    dtype_why: str
    max_model_len_why: str


def resolve_max_model_len(
    requested: int | None,
    model: ModelConfig,
    allow_long: bool,
    attention: AttentionBackend | None = None,
) -> tuple[int, str]:
    """The context length to serve, and why; longer than the model allows needs the opt-in.

    A model whose layers have sliding windows (Gemma's local layers, Mistral's every
    layer: kvrun.models.llama.every_layer_window) is served to its full length where the
    attention backend computes windows; elsewhere up to its shortest window, where
    global attention is exact (the model then asks the backend for no window). Qwen's
    opt-in window, on some layers only, is always served that way.
    """
    limit = model.max_position_embeddings
    why = f"the model's max_position_embeddings={limit}"
    if model.rope_context_length > limit:
        limit = model.rope_context_length
        why = f"the model's max_position_embeddings x its rope_scaling factor = {limit}"
    computes_windows = attention is not None and "sliding_window" in attention.features
    windowed = computes_windows and every_layer_window(model) is not None
    if model.sliding_window is not None and model.sliding_window < limit and not windowed:
        limit = model.sliding_window
        why = f"the model's sliding_window={limit} (kvrun attends globally)"
    windows = [w for w in model.layer_windows if w is not None]
    if windows and not computes_windows and min(windows) < limit:
        limit = min(windows)
        backend = attention.name if attention is not None else "the attention backend"
        why = f"the model's sliding_window={limit} ({backend} computes no sliding window)"
    if requested is None:
        return limit, why
    if requested > limit:
        if not allow_long:
            raise ConfigError(
                f"max_model_len={requested} exceeds {why}; lower it, or set "
                "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to allow it (outputs may be wrong)"
            )
        logger.warning(
            "max_model_len=%d exceeds %s; allowed by VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, "
            "outputs past the model's limit may be wrong",
            requested,
            why,
        )
    return requested, "asked for"


def released_window(model: ModelConfig, attention: AttentionBackend) -> int | None:
    """The sliding window behind which the scheduler releases a running request's KV
    blocks (SchedulerConfig.sliding_window), or None: nothing is released.

    Only where every attention layer has a window and the backend computes it: Mistral
    v0.1-style models (every_layer_window), or a model whose layer_windows are all local
    (the widest). Gemma 2/3 interleave global layers, and all layers share one block
    table, so a global layer still reads every position: nothing can be released.
    """
    if "sliding_window" not in attention.features:
        return None
    if model.layer_windows:
        local = [w for w in model.layer_windows if w is not None]
        return max(local) if len(local) == len(model.layer_windows) else None
    return every_layer_window(model)


def resolve_engine_config(
    args: EngineArgs, env: EnvSnapshot, platform: Platform, model: ModelConfig, source: str
) -> ResolvedConfig:
    """The EngineConfig for ``model`` (loaded from ``source``) on ``platform``: every
    default filled, every setting checked, the platform's adjustments applied."""
    asked_dtype = parse_dtype(args.dtype)
    dtype = asked_dtype or platform.default_dtype()
    dtype_why = "asked for" if asked_dtype else f"dtype=auto: {platform.name}'s default here"
    backend_name = args.attention_backend or env.VLLM_ATTENTION_BACKEND
    kv_cache_dtype = platform.resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
    spec = AttentionLayerSpec(
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        scale=model.attention_scale,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        logit_softcap=model.attn_logit_softcap,
    )
    attention = platform.attention_backend(backend_name, spec)
    if model.is_mla and model.mla_mode == "absorbed":
        # The latent's one plane, its value the first kv_lora_rank columns, where the
        # backend computes it; else two planes, logged (kvrun.models.deepseek).
        attention = with_latent_cache(attention, model.kv_lora_rank)
    max_model_len, len_why = resolve_max_model_len(
        args.max_model_len, model, env.VLLM_ALLOW_LONG_MAX_MODEL_LEN, attention
    )
    batched_tokens = args.max_num_batched_tokens or (
        DEFAULT_CHUNKED_BATCH_TOKENS if args.enable_chunked_prefill else max_model_len
    )
    if not args.enable_chunked_prefill and batched_tokens < max_model_len:
        raise ConfigError(
            f"max_num_batched_tokens={batched_tokens} is smaller than max_model_len="
            f"{max_model_len}; without chunked prefill a whole prompt must fit one step"
        )
    config = EngineConfig(
        model_source=source,
        # The default model is served under its hub id, not the GGUF's install path.
        model_name=args.served_model_name or (DEFAULT_HUB_MODEL if args.model is None else source),
        architecture=model.architecture,
        dtype=dtype,
        max_model_len=max_model_len,
        vocab_size=model.vocab_size,
        block_size=args.block_size or platform.default_block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        platform_name=platform.name,
        attention_backend=attention.name,
        kv_cache_dtype=kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        load_format=engine_load_format(args, env),
        trust_remote_code=args.trust_remote_code,
        quantization=args.quantization,
        structured_outputs_backend=structured_outputs_backend(args.structured_outputs_config),
        hidden_size=model.hidden_size,
        matryoshka=model.matryoshka,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=check_parallelism(
            args.tensor_parallel_size,
            args.pipeline_parallel_size,
            args.distributed_executor_backend,
        ),
        **resolve_runner(args, model),
        **resolve_lora(args),
    )
    config, adjustments = platform.check_config(config)
    for reason in adjustments:
        logger.info("platform %s adjusted the config: %s", platform.name, reason)
    return ResolvedConfig(config, attention, dtype_why, len_why)


def resolve_runner(args: EngineArgs, model: ModelConfig) -> dict[str, Any]:
    """EngineConfig's runner, convert and pooler: vLLM's runner/convert choices for
    ``model`` (a ``*ForSequenceClassification`` checkpoint is a classifier)."""
    classifier = bool(model.id2label)
    runner = args.runner if args.runner != "auto" else ("pooling" if classifier else "generate")
    if runner == "generate":
        if classifier:
            raise ConfigError(
                f"{model.architecture} is a classifier: it runs only as a pooling model; "
                "accepted: runner='auto' or 'pooling' (--runner pooling)"
            )
        if args.convert not in ("auto", "none"):
            raise ConfigError(
                f"convert={args.convert!r} applies to the pooling runner; add runner='pooling' "
                "(--runner pooling)"
            )
        # A generating engine serves embeddings too, beside generation in the same steps.
        return {"runner": "generate", "pooler": resolve_pooler(args.pooler_config, PoolerConfig())}
    convert = args.convert if args.convert != "auto" else ("classify" if classifier else "embed")
    if convert != ("classify" if classifier else "embed"):
        accepted = "auto, classify" if classifier else "auto, embed"
        what = (
            "a classifier (its score head gives class probabilities)"
            if classifier
            else "a causal language model, which kvrun's pooling runner turns into an "
            "embedding model; classifying needs a *ForSequenceClassification checkpoint"
        )
        raise ConfigError(
            f"convert={args.convert!r} is not supported for {model.architecture}, {what}; "
            f"accepted: {accepted}"
        )
    default = PoolerConfig(normalize=False) if classifier else PoolerConfig()
    pooler = resolve_pooler(args.pooler_config, default)
    return {"runner": "pooling", "pooler": pooler, "convert": convert, "id2label": model.id2label}


def resolve_lora(args: EngineArgs) -> dict[str, Any]:
    """EngineConfig's LoRA fields (either runner: pooling requests may name adapters too)."""
    if not args.enable_lora:
        return {}
    return {
        "enable_lora": True,
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras or args.max_loras,
    }


def _build_lora(config: EngineConfig, model: Any, platform: Platform) -> LoraManager:
    from kvrun.lora.manager import LoraManager

    ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
    manager = LoraManager(
        model.lora_targets(),
        max_loras=config.max_loras,
        max_lora_rank=config.max_lora_rank,
        max_cpu_loras=config.max_cpu_loras,
        dtype=config.dtype,
        device=platform.device,
        add_lora=ops.add_lora,
    )
    logger.info(
        "LoRA: %d device slot(s) of rank %d, %d adapter(s) kept in host memory",
        config.max_loras,
        config.max_lora_rank,
        config.max_cpu_loras,
    )
    return manager


def build_engine_parts(
    args: EngineArgs,
    env: EnvSnapshot,
    platform: Platform | None = None,
    entry_point: str = "offline",
) -> EngineParts:
    """``platform``: one already built (the conformance kit's class-path targets, whose
    probe refuses this machine); None selects it from ``env`` as usual. ``entry_point``
    ("offline" or "serve") decides which set variables are named as having no effect."""
    platform = platform or create_platform(env)
    warn_ineffective(env, platform.name, entry_point, platform.honoured_variables)
    platform.setup_process()
    checkpoint, model_config, model_cls = load_model_source(args, env)
    resolved = resolve_engine_config(args, env, platform, model_config, checkpoint.source)
    config = resolved.config
    if args.disable_custom_all_reduce and config.tensor_parallel_size == 1:
        logger.info("disable_custom_all_reduce has no effect: tensor_parallel_size=1")
    if config.enable_lora and not getattr(model_cls, "supports_lora", False):
        raise ConfigError(
            f"enable_lora: kvrun applies LoRA adapters to the Llama family (Llama, Mistral, "
            f"Qwen2, Qwen3, Phi-3), Gemma 2/3, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio and the "
            f"mixtures (Mixtral, Qwen2-MoE, Qwen3-MoE) and DeepSeek-V2/V3, not to "
            f"{model_config.architecture}"
        )

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(checkpoint)
    runner: StepRunner
    # A graph compiler's whole-model executor replaces the core model and owns its KV
    # cache; the scheduler and sampler below are the same either way.
    executor = platform.model_executor(config)
    # blocks behind this window are released as a request runs (None: nothing is)
    window = released_window(model_config, resolved.attention)
    if executor is not None and config.runner == "pooling":
        raise ConfigError(
            f"runner='pooling' needs the model's hidden states, which the {platform.name} "
            "platform's whole-model executor does not return; run embeddings on a platform "
            "that runs kvrun's own model code (cpu, cuda, rocm, hpu)"
        )
    if executor is not None and config.quantization == "gguf":
        raise ConfigError(
            f"quantization='gguf' runs GGUF blocks in kvrun's own model code; the "
            f"{platform.name} platform runs a whole-model executor (omit quantization)"
        )
    if executor is not None and config.enable_lora:
        raise ConfigError(
            f"enable_lora needs kvrun's own model code; the {platform.name} platform runs a "
            "whole-model executor that applies no adapters"
        )
    lora: LoraManager | ExecutorLoras | None = None
    if executor is not None and model_config.accepted_modalities:
        raise ConfigError(
            f"{model_config.architecture} takes media inputs through kvrun's own model code; "
            f"the {platform.name} platform runs a whole-model executor without them"
        )
    if config.distributed_executor_backend in ("mp", "ray"):
        # worker processes or Ray actors hold the model and the KV cache (kvrun.executor)
        from kvrun.executor.build import build_executor, check_executor_supported

        check_executor_supported(config.distributed_executor_backend, config, executor is not None)
        runner, plan = build_executor(
            args, env, platform, config, model_config, resolved.attention, model_cls
        )
        lora = runner.lora
    elif executor is not None:
        if executor.block_size != config.block_size:
            raise ConfigError(
                f"the {platform.name} executor uses KV blocks of {executor.block_size} tokens "
                f"but the engine was configured with block_size={config.block_size}"
            )
        plan = executor.init_kv_cache(args.num_kv_blocks, config.max_model_len)
        runner = ExecutorRunner(executor, platform.device)
    else:
        model, kv_caches, plan = _load_core_model(
            platform, config, model_config, model_cls, resolved.attention, checkpoint,
            args.num_kv_blocks,
        )  # fmt: skip
        if not args.enforce_eager:
            _compile_model(model, compile_settings(env))
        fused_decoder = platform.fused_decoder(model, kv_caches, config)
        decode_graph, plan = _decode_graphs(platform, model, kv_caches, config, plan, window)
        lora = _build_lora(config, model, platform) if config.enable_lora else None
        runner = ModelRunner(
            model,
            kv_caches,
            config.block_size,
            platform.device,
            fused_decoder=fused_decoder,
            decode_graph=decode_graph,
            lora=lora,
            mm_cache_size=env.VLLM_MM_INPUT_CACHE_SIZE,
        )
    multimodal = None
    if model_config.accepted_modalities:
        from kvrun.multimodal.processing import MultiModalProcessor

        multimodal = MultiModalProcessor(
            checkpoint.directory, model_config, checkpoint.source, args.mm_processor_kwargs
        )
    elif args.mm_processor_kwargs:
        raise ConfigError(
            f"mm_processor_kwargs applies to a multimodal model's processor; "
            f"{model_config.architecture} takes text only (omit mm_processor_kwargs)"
        )
    config = replace(config, num_kv_blocks=plan.num_blocks, kv_cache_bytes=plan.total_bytes)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            num_blocks=plan.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill,
            max_loras=config.max_loras,
            # whole-model executors attend over whole tables: nothing released there
            sliding_window=window if executor is None else None,
        ),
        # The platform may order free KV blocks (Gaudi's contiguous PA wants lowest id first).
        free_block_policy=platform.free_block_policy(config),
        # batches in flight at once: one per pipeline stage on the mp executor, else 1
        max_concurrent_batches=concurrent_batches(runner),
    )
    _log_start(platform, config, plan, resolved.dtype_why, resolved.max_model_len_why)
    record_usage(
        env,
        platform=platform.name,
        architecture=config.architecture,
        extra={
            "dtype": str(config.dtype).removeprefix("torch."),
            "attention_backend": config.attention_backend,
            "max_model_len": config.max_model_len,
        },
    )
    ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
    return EngineParts(
        platform,
        config,
        tokenizer,
        scheduler,
        runner,
        platform.top_k_top_p_sampler(),
        ops.apply_token_bitmask,
        lora,
        multimodal,
        ops.argmax,
    )


def load_model_source(args: EngineArgs, env: EnvSnapshot) -> tuple[Checkpoint, ModelConfig, Any]:
    """The checkpoint ``args`` name, its ModelConfig (with the engine's MoE/MLA settings)
    and the model class its architecture resolves to (general plugins' included)."""
    plugin_manager = load_general_plugins(env.VLLM_PLUGINS)
    registry = ModelRegistry()
    for extra in plugin_manager.hook.kvrun_model_architectures():
        registry = registry.extended(extra)

    checkpoint = load_engine_checkpoint(args, env, native_architectures=registry.entries)
    model_config = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    if model_config.is_moe:
        model_config = replace(model_config, moe_chunk_size=env.VLLM_FUSED_MOE_CHUNK_SIZE)
    if model_config.is_mla:
        model_config = _mla_mode(model_config, env)
    if env.VLLM_MLA_DISABLE_REQUANTIZATION:
        _warn_no_requantization(model_config)
    model_cls = registry.resolve(model_config.architecture, checkpoint.source)
    return checkpoint, model_config, model_cls


def _compile_model(model: Any, settings: CompileSettings) -> None:
    """torch.compile the model's dense block (enforce_eager=False), when it has one."""
    compile_hook = getattr(model, "compile", None)
    if compile_hook is None:
        logger.info(
            "enforce_eager=False: %s has no compilable block; it runs eagerly",
            type(model).__name__,
        )
        return
    compile_hook(lambda fn, name: compile_function(fn, settings, name))


def _warn_no_requantization(model: ModelConfig) -> None:
    """VLLM_MLA_DISABLE_REQUANTIZATION=1 named where it changes nothing: it acts only on
    latent attention absorbed at load from an fp8 checkpoint (kvrun.models.deepseek)."""
    if not model.is_mla:
        why = f"{model.architecture} has no latent attention"
    elif model.fp8_weight_block is None:
        why = "the checkpoint's weights are not fp8"
    elif model.mla_mode != "absorbed" or not model.mla_fused:
        why = "the MLA matrices are not absorbed at load"
    else:
        return
    logger.warning(
        "VLLM_MLA_DISABLE_REQUANTIZATION=1 has no effect: it keeps the absorbed MLA "
        "matrices of an fp8 checkpoint off the fp8 grid, and %s",
        why,
    )


def _mla_mode(model: ModelConfig, env: EnvSnapshot) -> ModelConfig:
    """Latent attention's mode from VLLM_MLA_DISABLE / VLLM_MLA_PERFORM_MATRIX_ABSORPTION
    (kvrun.models.deepseek), logged with the bytes per token it caches."""
    if env.VLLM_MLA_DISABLE:
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        model = replace(model, mla_mode="mha", num_kv_heads=model.num_heads, head_dim=qk)
        values = model.num_kv_heads * model.head_dim
        how = (
            "VLLM_MLA_DISABLE=1: every head's key and value cached, "
            f"2 x {values} values per token and layer"
        )
    else:
        model = replace(
            model,
            mla_fused=env.VLLM_MLA_PERFORM_MATRIX_ABSORPTION,
            # fp8 weights: absorbed matrices back on the fp8 grid (kvrun.models.deepseek)
            mla_requantize=not env.VLLM_MLA_DISABLE_REQUANTIZATION,
        )
        how = (
            f"the latent [c | k_pe] cached, {model.head_dim} values per token and layer in "
            f"one plane (the value is its first {model.kv_lora_rank} columns; two planes "
            "where the attention backend keeps no latent cache); W_UK/W_UV "
            + ("absorbed at load" if model.mla_fused else "applied per step")
        )
    logger.info("multi-head latent attention: %s", how)
    return model


def _load_core_model(
    platform: Platform,
    config: EngineConfig,
    model_config: ModelConfig,
    model_cls: Any,
    attention: AttentionBackend,
    checkpoint: Checkpoint,
    num_kv_blocks: int | None,
) -> tuple[Any, list[torch.Tensor], KVCachePlan]:
    """The core model with its weights, and the KV cache the platform allocates for it."""
    ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
    # past the model's context only under VLLM_ALLOW_LONG_MAX_MODEL_LEN
    model_config = replace(model_config, serve_positions=config.max_model_len)
    model = model_cls(model_config, ops, attention, config.dtype, platform.device)
    # quantization="gguf": the matrices that run as stored (kvrun.quantization)
    keep = plan_quantized_load(config.quantization, checkpoint, model, platform)
    weights = checkpoint.iter_weights(
        config.dtype,
        awq_dequantize=ops.awq_dequantize,
        awq_device=platform.device,
        keep_quantized=keep,
    )
    model.load_weights(weights, config.model_source)
    kv_request = kv_cache_request(
        platform, config, model_config, attention, model if num_kv_blocks is None else None
    )
    plan = _plan_kv_cache(platform, kv_request, num_kv_blocks)
    kv_caches = platform.allocate_kv_cache(plan, model_config.num_layers)
    return model, kv_caches, plan


def kv_cache_request(
    platform: Platform,
    config: EngineConfig,
    model_config: ModelConfig,
    attention: AttentionBackend,
    profile_model: Any | None,
) -> KVCacheRequest:
    """What the KV cache of ``model_config``'s layers and KV heads needs (a tensor-parallel
    rank passes its own shape); ``profile_model``: run it once so that a platform that
    profiles budgets from the measured peak (None: no profiling, a fixed block count)."""

    def layer_shape(n: int) -> tuple[int, ...]:
        return attention.layer_cache_shape(
            n, config.block_size, model_config.num_kv_heads, model_config.head_dim
        )

    peak = None
    if profile_model is not None:
        peak = platform.measure_peak_memory(
            make_profile_run(
                profile_model,
                model_config.num_layers,
                layer_shape,
                config.cache_dtype,
                config.max_num_batched_tokens,
                config.max_num_seqs,
                config.block_size,
                platform.device,
            )
        )
    return KVCacheRequest(
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        block_size=config.block_size,
        dtype=config.cache_dtype,
        max_model_len=config.max_model_len,
        layer_shape=layer_shape,
        kv_planes=attention.spec.kv_planes,
        gpu_memory_utilization=config.gpu_memory_utilization,
        peak_memory_bytes=peak,
        # a windowed model's sequence holds one step's span of blocks (capacity.py)
        sliding_window=released_window(model_config, attention),
        max_chunk_tokens=config.max_num_batched_tokens,
    )


def _decode_graphs(
    platform: Platform,
    model: CausalLM,
    kv_caches: list[torch.Tensor],
    config: EngineConfig,
    plan: KVCachePlan,
    sliding_window: int | None = None,  # released_window: a sequence holds one step's span
) -> tuple[Any, KVCachePlan]:
    """The platform's decode graphs (or None), and the plan's blocks minus the reserve.

    Reserved blocks are the highest ids, so the block manager (ids 0..n-1) never hands
    them out and graph padding rows may write there.
    """
    reserved = platform.reserved_kv_blocks(config)
    usable = plan.num_blocks - reserved
    require_blocks(
        usable,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        holder=(
            f"the KV cache of {plan.num_blocks} blocks, less the {reserved} the "
            f"{platform.name} platform reserves for decode-graph padding,"
        ),
        remedy="raise the cache size (num_kv_blocks) or lower max_model_len",
        sliding_window=sliding_window,
        max_chunk_tokens=config.max_num_batched_tokens,
    )

    def forward(ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> torch.Tensor:
        return model.forward(ids, positions, kv_caches, meta)

    graph = platform.decode_graph_runner(forward, config, pad_slot=usable * config.block_size)
    return graph, (replace(plan, num_blocks=usable) if reserved else plan)


def _plan_kv_cache(
    platform: Platform, request: KVCacheRequest, num_blocks: int | None
) -> KVCachePlan:
    if num_blocks is None:
        return platform.plan_kv_cache(request)
    return plan_exact_kv_blocks(request, num_blocks, f"num_kv_blocks={num_blocks} asked for")


def _log_start(
    platform: Platform, config: EngineConfig, plan: KVCachePlan, dtype_why: str, len_why: str
) -> None:
    logger.info("platform: %s", platform.describe())
    logger.info(
        "model %s (%s), dtype %s (%s), attention backend %s",
        config.model_source,
        config.architecture,
        str(config.dtype).removeprefix("torch."),
        dtype_why,
        config.attention_backend,
    )
    tokens = plan.num_blocks * plan.block_size
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %d bytes each), %.3f GiB (%s); "
        "max_model_len %d (%s)",
        plan.num_blocks,
        plan.block_size,
        tokens,
        plan.total_bytes // max(tokens, 1),
        plan.total_bytes / GiB,
        plan.reason,
        config.max_model_len,
        len_why,
    )
