"""kvrun-cuda: identity, the probe's answer, the budget arithmetic and the cuda variables."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from kvrun.config import EngineConfig
from kvrun.env_effects import ineffective
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.ops import reference
from kvrun.platforms import Unavailable
from kvrun.platforms.memory import device_memory_budget
from kvrun_cuda import probe
from kvrun_cuda.kernels import select_ops
from kvrun_cuda.platform import CudaPlatform, refused_settings
from kvrun_cuda.sampler import flashinfer_sampler

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None

GiB = 1 << 30


def test_identity() -> None:
    assert (CudaPlatform.name, CudaPlatform.device_type, CudaPlatform.dist_backend) == (
        "cuda",
        "cuda",
        "nccl",
    )
    assert CudaPlatform.priority == 100
    assert CudaPlatform.supported_dtypes == (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch here is a CUDA build")
def test_probe_on_a_cpu_only_torch() -> None:
    assert probe() == Unavailable(
        f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    )


def test_budget_is_the_share_minus_weights() -> None:
    budget, reason = device_memory_budget(70 * GiB, 80 * GiB, 10 * GiB, "cuda:0")
    assert budget == int(80 * GiB * 0.9) - 10 * GiB
    assert reason == "0.9 of 80.00 GiB on cuda:0 minus 10.00 GiB of weights"


def test_budget_keeps_headroom_when_others_hold_memory() -> None:
    budget, reason = device_memory_budget(20 * GiB, 80 * GiB, 10 * GiB, "cuda:1")
    assert budget == 20 * GiB - (80 * GiB - int(80 * GiB * 0.9))
    assert reason == (
        "0.9 of 80.00 GiB on cuda:1 minus 10.00 GiB of weights, capped to 12.00 GiB because "
        "only 20.00 GiB is free (other allocations hold the rest)"
    )
    assert device_memory_budget(5 * GiB, 80 * GiB, 10 * GiB, "cuda:0")[0] == 0


# --- the cuda group's variables -------------------------------------------------------


def engine_config(
    backend: str = "TRITON_ATTN", dtype: torch.dtype = torch.bfloat16
) -> EngineConfig:
    return EngineConfig(
        model_source="m",
        model_name="m",
        architecture="LlamaForCausalLM",
        dtype=dtype,
        max_model_len=64,
        vocab_size=100,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=20,
        platform_name="cuda",
        attention_backend=backend,
    )


def test_check_config_passes_a_plain_config(caplog: pytest.LogCaptureFixture) -> None:
    config = engine_config()
    with caplog.at_level(logging.INFO, logger="kvrun.cuda"):
        assert CudaPlatform(read_env({})).check_config(config) == (config, [])
    assert caplog.records == []


def test_force_fp8_marlin_is_reported_unsupported() -> None:
    platform = CudaPlatform(read_env({"VLLM_TEST_FORCE_FP8_MARLIN": "1"}))
    with pytest.raises(ConfigError) as err:
        platform.check_config(engine_config())
    assert str(err.value) == (
        "VLLM_TEST_FORCE_FP8_MARLIN=1 forces FP8 Marlin kernels, which kvrun-cuda does not "
        "have (no fp8 weight path yet); unset it"
    )


def test_variables_without_a_feature_yet_are_named_on_cuda() -> None:
    env = read_env(
        {
            "VLLM_FUSED_MOE_CHUNK_SIZE": "1024",  # acts on every platform: not named
            "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON": "1",  # the Triton fused_moe's alignment
            "VLLM_FLASH_ATTN_VERSION": "3",
            "MAX_JOBS": "4",
            "VLLM_USE_TRITON_AWQ": "1",
        }
    )
    assert refused_settings(env) == []
    named = dict(ineffective(env, "cuda", "offline"))
    assert sorted(named) == ["MAX_JOBS", "VLLM_FLASH_ATTN_VERSION"]
    assert named["VLLM_FLASH_ATTN_VERSION"].startswith("kvrun-cuda has no FLASH_ATTN backend")
    assert "kvrun-cuda's kernels are Triton" in named["MAX_JOBS"]
    # Elsewhere the alignment variable is named, with the reason.
    on_cpu = dict(ineffective(env, "cpu", "offline"))
    assert "only kvrun-cuda's Triton fused_moe" in on_cpu["VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON"]
    assert "VLLM_FUSED_MOE_CHUNK_SIZE" not in on_cpu


def test_check_config_refuses_a_dtype_the_backend_cannot_run() -> None:
    with pytest.raises(ConfigError) as err:
        CudaPlatform(read_env({})).check_config(engine_config("XFORMERS", torch.float32))
    assert str(err.value).startswith("attention backend XFORMERS does not run dtype float32")


def test_disabled_kernels_fall_back_to_the_reference() -> None:
    available = {"rms_norm": reference.rms_norm, "silu_and_mul": reference.silu_and_mul}
    chosen, notes = select_ops(available, ["rms_norm", "paged_attention", "MarlinLinearKernel"])
    assert chosen == {"silu_and_mul": reference.silu_and_mul}
    assert notes == [
        "VLLM_DISABLED_KERNELS: rms_norm runs the reference op",
        "VLLM_DISABLED_KERNELS: paged_attention has no kernel here; the reference runs",
        "VLLM_DISABLED_KERNELS: 'MarlinLinearKernel' names no kernel of this platform; known "
        "ops: prepare_linear, linear, embedding, rms_norm, fused_add_rms_norm, "
        "rotary_embedding, silu_and_mul, fused_moe, prepare_experts, reshape_and_cache, "
        "paged_attention, awq_dequantize, apply_token_bitmask, argmax, add_lora",
    ]
    assert select_ops(available, []) == (available, [])


def test_disabling_prepare_experts_takes_the_triton_fused_moe_with_it() -> None:
    # The Triton fused_moe reads the stacks prepare_experts makes; without them it would
    # get lists, so it runs the reference, and the log says why.
    available = {"fused_moe": reference.fused_moe, "prepare_experts": reference.prepare_experts}
    chosen, notes = select_ops(available, ["prepare_experts"])
    assert chosen == {}
    assert notes == [
        "VLLM_DISABLED_KERNELS: prepare_experts is disabled, so fused_moe (which reads the "
        "stacked experts) runs the reference op too",
        "VLLM_DISABLED_KERNELS: prepare_experts runs the reference op",
    ]
    # Disabling fused_moe alone keeps the stacks, which the reference fused_moe reads.
    chosen, _ = select_ops(available, ["fused_moe"])
    assert chosen == {"prepare_experts": reference.prepare_experts}


def test_triton_awq_dequantisation_is_an_opt_in() -> None:
    available = {"rms_norm": reference.rms_norm, "awq_dequantize": reference.awq_dequantize}
    # VLLM_USE_TRITON_AWQ=0 (vLLM's default): the reference op dequantises, silently.
    assert select_ops(available, [], use_triton_awq=False) == (
        {"rms_norm": reference.rms_norm},
        [],
    )
    assert select_ops(available, [], use_triton_awq=True) == (
        available,
        ["VLLM_USE_TRITON_AWQ: AWQ checkpoints are dequantised in Triton"],
    )
    # VLLM_DISABLED_KERNELS wins over the opt-in.
    chosen, notes = select_ops(available, ["awq_dequantize"], use_triton_awq=True)
    assert chosen == {"rms_norm": reference.rms_norm}
    assert notes == ["VLLM_DISABLED_KERNELS: awq_dequantize runs the reference op"]


@pytest.mark.skipif(HAS_FLASHINFER, reason="flashinfer is installed here")
def test_flashinfer_sampler_switch() -> None:
    assert flashinfer_sampler(False) == (
        None,
        "VLLM_USE_FLASHINFER_SAMPLER=0: the torch sampler runs",
    )
    assert flashinfer_sampler(None) == (None, "FlashInfer is not installed: the torch sampler runs")
    with pytest.raises(ConfigError) as err:
        flashinfer_sampler(
            read_env({"VLLM_USE_FLASHINFER_SAMPLER": "1"}).VLLM_USE_FLASHINFER_SAMPLER
        )
    assert str(err.value) == (
        "VLLM_USE_FLASHINFER_SAMPLER=1 needs flashinfer-python, which is not installed "
        "(pip install flashinfer-python); unset it or set it to 0"
    )
