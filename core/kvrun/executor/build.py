"""What the engine builder needs to run the model on the mp or ray executor.

:func:`build_executor` turns the resolved EngineConfig and the environment into the
executor's settings (mp: the rendezvous address from VLLM_HOST_IP/VLLM_PORT,
VLLM_WORKER_MULTIPROC_METHOD, VLLM_RINGBUFFER_WARNING_INTERVAL; ray: the VLLM_RAY_*
variables), starts the ranks with the options this process resolved, and describes
their KV cache (the smallest rank's budget) as a plan for the start-up log and the
scheduler. With enable_lora it gives the executor the engine's side of the adapters
(:class:`~kvrun.lora.slots.ExecutorLoras`: which adapter is in which of the ranks'
slots, sent with each step). The executors themselves are :mod:`kvrun.executor.mp` and
:mod:`kvrun.executor.ray_executor`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from kvrun.attention.base import AttentionBackend
from kvrun.config import EngineArgs, EngineConfig
from kvrun.envs import VARIABLES, EnvSnapshot
from kvrun.errors import ConfigError
from kvrun.executor.mp import MultiprocExecutor, MultiprocSettings
from kvrun.executor.processes import resolve_start_method
from kvrun.executor.ray_executor import RayExecutor, RaySettings, bundle_indices, import_ray
from kvrun.lora.sharding import unsplit_modules
from kvrun.lora.slots import ExecutorLoras, model_lora_targets
from kvrun.models.config import ModelConfig
from kvrun.platforms import KVCachePlan, Platform, plan_exact_kv_blocks

__all__ = ["build_executor", "check_executor_supported", "worker_environment"]

logger = logging.getLogger(__name__)


def worker_environment(env: EnvSnapshot) -> dict[str, str]:
    """The variables the engine was started with, as text, for the workers to read."""
    raw = {var.name: env.raw(var.name) for var in VARIABLES}
    return {name: text for name, text in raw.items() if text is not None}


_RANKS = {"mp": "worker process(es)", "ray": "Ray actor(s)"}


def check_executor_supported(
    backend: str, config: EngineConfig, whole_model_executor: bool
) -> None:
    """Refuse (ConfigError) what the ranks of the mp and ray executors do not run."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    what = f"distributed_executor_backend={backend!r} ({world} {_RANKS[backend]})"
    if whole_model_executor:
        raise ConfigError(
            f"{what} runs kvrun's own model code; the {config.platform_name} platform runs a "
            "whole-model executor; accepted there: tensor_parallel_size=1, "
            "pipeline_parallel_size=1, distributed_executor_backend='uni'"
        )


def build_executor(
    args: EngineArgs,
    env: EnvSnapshot,
    platform: Platform,
    config: EngineConfig,
    model: ModelConfig,
    attention: AttentionBackend,
    model_cls: Any = None,  # the model's class (enable_lora: its LoRA surface)
) -> tuple[MultiprocExecutor | RayExecutor, KVCachePlan]:
    """Start the ranks of ``config.distributed_executor_backend`` (mp or ray); the
    executor and a plan of the blocks every rank holds (the smallest rank's budget)."""
    from kvrun.engine.builder import kv_cache_request

    backend = config.distributed_executor_backend
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    threads = max(1, torch.get_num_threads() // world)
    # The ranks resolve the options exactly as this process did.
    rank_args = replace(
        args,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    executor: MultiprocExecutor | RayExecutor
    if backend == "mp":
        executor = MultiprocExecutor(
            rank_args,
            worker_environment(env),
            _mp_settings(env, config, threads, model.vocab_size),
            config.block_size,
        )
    else:
        executor = RayExecutor(
            rank_args,
            worker_environment(env),
            _ray_settings(env, platform, config, threads, model.vocab_size),
            config.block_size,
        )
    try:
        if config.enable_lora:
            executor.lora = _executor_loras(platform, config, model, attention, model_cls)
        request = kv_cache_request(platform, config, model, attention, None)
        plan = plan_exact_kv_blocks(
            request,
            executor.num_kv_blocks,
            f"the smallest of the {world} {_RANKS[backend]}' KV budgets "
            "(the whole model's size shown)",
        )
    except BaseException:
        executor.close()
        raise
    return executor, plan


def _executor_loras(
    platform: Platform,
    config: EngineConfig,
    model: ModelConfig,
    attention: AttentionBackend,
    model_cls: Any,
) -> ExecutorLoras:
    from kvrun.ops import reference_ops

    if model_cls is None:
        raise ConfigError("enable_lora with an executor needs the model's class")
    ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
    targets = model_lora_targets(model_cls, model, ops, attention, config.dtype)
    unsplit = unsplit_modules(targets.modules) if config.tensor_parallel_size > 1 else []
    if unsplit:
        raise ConfigError(
            f"enable_lora with tensor_parallel_size={config.tensor_parallel_size}: "
            f"{model.architecture}'s LoRA modules {', '.join(unsplit)} are not split across "
            "tensor-parallel ranks (kvrun.lora.sharding); accepted: tensor_parallel_size=1"
        )
    logger.info(
        "LoRA: %d slot(s) of rank %d on every rank, each rank reading adapters from their "
        "path and keeping its shard",
        config.max_loras,
        config.max_lora_rank,
    )
    return ExecutorLoras(targets, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank)


def _mp_settings(
    env: EnvSnapshot, config: EngineConfig, threads: int, vocab_size: int
) -> MultiprocSettings:
    from kvrun.distributed.state import init_method, rendezvous_address

    world = config.tensor_parallel_size * config.pipeline_parallel_size
    host, port = rendezvous_address(env)
    settings = MultiprocSettings(
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        init_method=init_method(host, port),
        start_method=resolve_start_method(env.VLLM_WORKER_MULTIPROC_METHOD, threads),
        threads_per_worker=threads,
        ring_warning_interval_s=float(env.VLLM_RINGBUFFER_WARNING_INTERVAL),
        # the largest step's float32 logits (its pages are allocated as they are written)
        result_area_bytes=config.max_num_seqs * vocab_size * 4,
    )
    logger.info(
        "mp executor: %d worker(s) (tensor %d x pipeline %d), %d torch thread(s) each "
        "(this process's %d / %d workers, at least 1), started by %s",
        world,
        config.tensor_parallel_size,
        config.pipeline_parallel_size,
        threads,
        torch.get_num_threads(),
        world,
        settings.start_method,
    )
    return settings


def _ray_settings(
    env: EnvSnapshot, platform: Platform, config: EngineConfig, threads: int, vocab_size: int
) -> RaySettings:
    from kvrun.distributed.state import node_ip

    import_ray()
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    on_gpu = platform.device.type == "cuda"
    settings = RaySettings(
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        threads_per_worker=threads,
        gpus_per_worker=float(env.VLLM_RAY_PER_WORKER_GPUS) if on_gpu else 0.0,
        bundles=list(env.VLLM_RAY_BUNDLE_INDICES),
        compiled_graph=bool(env.VLLM_USE_RAY_COMPILED_DAG),
        overlap_gpu_communication=on_gpu and bool(env.VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM),
        node_ip=node_ip(env),
        # the node-local path's result area: the largest step's float32 logits
        result_area_bytes=config.max_num_seqs * vocab_size * 4,
        ring_warning_interval_s=float(env.VLLM_RINGBUFFER_WARNING_INTERVAL),
    )
    bundle_indices(settings.bundles, world)  # a bad list fails before Ray starts
    return settings
