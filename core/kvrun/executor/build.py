"""What the engine builder needs to run the model on the mp executor.

:func:`build_mp_executor` turns the resolved EngineConfig and the environment into
:class:`~kvrun.executor.mp.MultiprocSettings` (the rendezvous address from
VLLM_HOST_IP/VLLM_PORT, VLLM_WORKER_MULTIPROC_METHOD, the thread split,
VLLM_RINGBUFFER_WARNING_INTERVAL), starts the workers, and describes their KV cache as
a plan for the start-up log and the scheduler.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from kvrun.attention.base import AttentionBackend
from kvrun.config import EngineArgs, EngineConfig
from kvrun.envs import VARIABLES, EnvSnapshot
from kvrun.errors import ConfigError
from kvrun.executor.mp import MultiprocExecutor, MultiprocSettings
from kvrun.executor.processes import resolve_start_method
from kvrun.models.config import ModelConfig
from kvrun.platforms import KVCachePlan, Platform, plan_exact_kv_blocks

__all__ = ["build_mp_executor", "check_mp_supported", "worker_environment"]

logger = logging.getLogger(__name__)


def worker_environment(env: EnvSnapshot) -> dict[str, str]:
    """The variables the engine was started with, as text, for the workers to read."""
    raw = {var.name: env.raw(var.name) for var in VARIABLES}
    return {name: text for name, text in raw.items() if text is not None}


def check_mp_supported(
    config: EngineConfig, model: ModelConfig, whole_model_executor: bool
) -> None:
    """Refuse (ConfigError) what the mp executor's workers do not run."""
    world = config.tensor_parallel_size * config.pipeline_parallel_size
    what = f"distributed_executor_backend='mp' ({world} worker process(es))"
    if whole_model_executor:
        raise ConfigError(
            f"{what} runs kvrun's own model code; the {config.platform_name} platform runs a "
            "whole-model executor; accepted there: tensor_parallel_size=1, "
            "pipeline_parallel_size=1, distributed_executor_backend='uni'"
        )
    if config.enable_lora:
        raise ConfigError(f"{what} applies no LoRA adapters yet; accepted: enable_lora=False")
    if model.accepted_modalities:
        raise ConfigError(
            f"{what} does not send media inputs to its workers; {model.architecture} runs "
            "with distributed_executor_backend='uni'"
        )


def build_mp_executor(
    args: EngineArgs,
    env: EnvSnapshot,
    platform: Platform,
    config: EngineConfig,
    model: ModelConfig,
    attention: AttentionBackend,
) -> tuple[MultiprocExecutor, KVCachePlan]:
    """Start the workers; the executor and a plan of the blocks every rank holds."""
    from kvrun.distributed.state import init_method, rendezvous_address
    from kvrun.engine.builder import kv_cache_request

    world = config.tensor_parallel_size * config.pipeline_parallel_size
    threads = max(1, torch.get_num_threads() // world)
    host, port = rendezvous_address(env)
    settings = MultiprocSettings(
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        init_method=init_method(host, port),
        start_method=resolve_start_method(env.VLLM_WORKER_MULTIPROC_METHOD, threads),
        threads_per_worker=threads,
        ring_warning_interval_s=float(env.VLLM_RINGBUFFER_WARNING_INTERVAL),
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
    # The workers resolve the options exactly as this process did.
    worker_args = replace(
        args,
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    executor = MultiprocExecutor(worker_args, worker_environment(env), settings, config.block_size)
    try:
        request = kv_cache_request(platform, config, model, attention, None)
        plan = plan_exact_kv_blocks(
            request,
            executor.num_kv_blocks,
            f"the smallest of the {world} workers' KV budgets (the whole model's size shown)",
        )
    except BaseException:
        executor.close()
        raise
    return executor, plan
