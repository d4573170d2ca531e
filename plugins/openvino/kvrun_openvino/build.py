"""From an engine config to a ready executor: export (cached), make paged, compile."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kvrun.loader import load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun_openvino.executor import INFERENCE_PRECISION, OpenvinoExecutor
from kvrun_openvino.export import ExportOptions, export_ir, paged_model

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.envs import EnvSnapshot

__all__ = ["build_executor", "compile_properties"]

logger = logging.getLogger(__name__)


def compile_properties(env: EnvSnapshot, config: EngineConfig) -> dict[str, str]:
    """OpenVINO compile properties for this engine's dtype and cache precision.

    The inference precision follows the engine dtype: left alone, the CPU plugin runs
    bf16 on a CPU with AVX512-BF16 even for an fp32 model. The cache precision is
    VLLM_OPENVINO_CPU_KV_CACHE_PRECISION when set, else the engine dtype's (the CPU
    plugin's own default is u8, which is lossy).
    """
    inference = INFERENCE_PRECISION[config.dtype]
    cache = env.VLLM_OPENVINO_CPU_KV_CACHE_PRECISION or inference
    return {"INFERENCE_PRECISION_HINT": inference, "KV_CACHE_PRECISION": cache}


def build_executor(
    env: EnvSnapshot, config: EngineConfig, budget: tuple[int, str]
) -> OpenvinoExecutor:
    import openvino

    checkpoint = load_checkpoint(
        config.model_source,
        hf_hub_offline=env.HF_HUB_OFFLINE,
        use_modelscope=env.VLLM_USE_MODELSCOPE,
    )
    model = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    options = ExportOptions(int8_weights=env.VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS)
    start = time.perf_counter()
    ir = export_ir(checkpoint, model, options, env.VLLM_CACHE_ROOT)
    paged = paged_model(ir)
    properties = compile_properties(env, config)
    compiled = openvino.Core().compile_model(paged, env.VLLM_OPENVINO_DEVICE, properties)
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if got != properties["INFERENCE_PRECISION_HINT"]:
        # A precision the device lacks is accepted without error and runs as another.
        logger.warning(
            "OpenVINO on %s runs %s although dtype %s asked for %s",
            env.VLLM_OPENVINO_DEVICE,
            got,
            str(config.dtype).removeprefix("torch."),
            properties["INFERENCE_PRECISION_HINT"],
        )
    executor = OpenvinoExecutor(compiled, budget, properties["KV_CACHE_PRECISION"])
    logger.info(
        "OpenVINO model ready on %s in %.1f s (inference %s, KV cache %s, blocks of %d)",
        env.VLLM_OPENVINO_DEVICE,
        time.perf_counter() - start,
        got,
        executor.cache_type_name,
        executor.block_size,
    )
    return executor
