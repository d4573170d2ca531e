"""From an engine config to a ready executor: export (cached), make paged, compile."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvrun.loader import S3Settings, load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun_openvino.executor import INFERENCE_PRECISION, OpenvinoExecutor
from kvrun_openvino.export import ExportOptions, export_ir, paged_model

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.envs import EnvSnapshot

__all__ = ["CompilePlan", "build_executor", "compile_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompilePlan:
    """What kvrun asks OpenVINO's compiler for, and why where it is not the obvious."""

    inference: str  # INFERENCE_PRECISION_HINT: "f32", "bf16", "f16"
    kv_cache: str  # KV_CACHE_PRECISION asked for; the executor reads back what was chosen
    note: str | None  # logged once at start when the plan departs from the engine dtype

    @property
    def properties(self) -> dict[str, str]:
        return {"INFERENCE_PRECISION_HINT": self.inference, "KV_CACHE_PRECISION": self.kv_cache}


def compile_plan(env: EnvSnapshot, config: EngineConfig) -> CompilePlan:
    """OpenVINO compile properties for this engine's dtype and cache precision.

    The inference precision follows the engine dtype: left alone, the CPU plugin runs
    bf16 on a CPU with AVX512-BF16 even for an fp32 model. The cache precision is
    VLLM_OPENVINO_CPU_KV_CACHE_PRECISION when set, else the engine dtype's (the CPU
    plugin's own default is u8, which is lossy).

    float16 on the CPU device computes in f32 over an f16 cache. The CPU plugin's
    native f16 paged attention, which it takes on a CPU with AVX512_FP16 (Sapphire
    Rapids), returns wrong logits (NaN from prompts of ~18 tokens, whatever the head
    size or the cache precision; openvino 2026.4.1, the same graph's f16 SDPA form is
    right), and a CPU without AVX512_FP16 runs an f16 hint as f32 anyway. Computing in
    f32 gives one behaviour on every CPU and keeps the f16 cache's memory saving.
    """
    cache_asked = env.VLLM_OPENVINO_CPU_KV_CACHE_PRECISION
    inference = INFERENCE_PRECISION[config.dtype]
    note = None
    if config.dtype == torch.float16 and env.VLLM_OPENVINO_DEVICE.split(".")[0] == "CPU":
        inference = "f32"
        note = (
            "dtype float16 on OpenVINO's CPU device computes in f32 over an f16 KV cache: "
            "the CPU plugin's f16 paged attention gives wrong results on AVX512_FP16 CPUs"
        )
        return CompilePlan(inference, cache_asked or "f16", note)
    return CompilePlan(inference, cache_asked or inference, note)


def build_executor(
    env: EnvSnapshot, config: EngineConfig, budget: tuple[int, str]
) -> OpenvinoExecutor:
    import openvino

    checkpoint = load_checkpoint(
        config.model_source,
        hf_hub_offline=env.HF_HUB_OFFLINE,
        use_modelscope=env.VLLM_USE_MODELSCOPE,
        load_format=config.load_format,
        trust_remote_code=config.trust_remote_code,
        dummy_seed=config.seed,
        s3=S3Settings.from_env(env),
    )
    model = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    options = ExportOptions(int8_weights=env.VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS)
    start = time.perf_counter()
    ir = export_ir(checkpoint, model, options, env.VLLM_CACHE_ROOT)
    paged = paged_model(ir)
    plan = compile_plan(env, config)
    if plan.note is not None:
        logger.info("%s", plan.note)
    compiled = openvino.Core().compile_model(paged, env.VLLM_OPENVINO_DEVICE, plan.properties)
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if got != plan.inference:
        # A precision the device lacks is accepted without error and runs as another.
        logger.warning(
            "OpenVINO on %s runs %s although dtype %s asked for %s",
            env.VLLM_OPENVINO_DEVICE,
            got,
            str(config.dtype).removeprefix("torch."),
            plan.inference,
        )
    executor = OpenvinoExecutor(compiled, budget, plan.kv_cache)
    logger.info(
        "OpenVINO model ready on %s in %.1f s (inference %s, KV cache %s, blocks of %d)",
        env.VLLM_OPENVINO_DEVICE,
        time.perf_counter() - start,
        got,
        executor.cache_type_name,
        executor.block_size,
    )
    return executor
