"""kvrun-hpu: identity and the probe's answer on this machine."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.config import EngineConfig
from kvrun.envs import read_env
from kvrun.errors import ConfigError, KvrunError
from kvrun.platforms import Unavailable
from kvrun.scheduling import LowestIdFirst
from kvrun_hpu import probe
from kvrun_hpu.attention import HpuFlatAttention
from kvrun_hpu.platform import HpuPlatform


def test_identity() -> None:
    assert (HpuPlatform.name, HpuPlatform.device_type, HpuPlatform.dist_backend) == (
        "hpu",
        "hpu",
        "hccl",
    )
    assert HpuPlatform.priority == 70
    assert HpuPlatform.supported_dtypes == (torch.bfloat16, torch.float32)


@pytest.mark.skipif(
    importlib.util.find_spec("habana_frameworks") is not None, reason="Gaudi stack present"
)
def test_probe_without_the_gaudi_stack() -> None:
    assert probe() == Unavailable(
        "habana_frameworks is not installed: the Intel Gaudi software stack comes from "
        "Intel's Gaudi installer or Docker images, not PyPI"
    )


def engine_config(**overrides: object) -> EngineConfig:
    values: dict[str, object] = dict(
        model_source="m",
        model_name="m",
        architecture="LlamaForCausalLM",
        dtype=torch.bfloat16,
        max_model_len=256,
        vocab_size=100,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=0,
        platform_name="hpu",
        attention_backend="HPU_ATTN",
    )
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def platform(**environ: str) -> HpuPlatform:
    return HpuPlatform(read_env(environ))


def test_contiguous_pa_is_the_default_and_takes_no_prefix_cache() -> None:
    # The engine fills in HpuPlatform.default_block_size (128) when the user sets none;
    # check_config keeps whatever block size it gets, 16 included.
    assert HpuPlatform.default_block_size == 128
    config, reasons = platform().check_config(engine_config())
    assert (config.block_size, config.enable_prefix_caching) == (16, False)
    assert config == replace(engine_config(), enable_prefix_caching=False)
    assert reasons == [
        "enable_prefix_caching True -> False: VLLM_CONTIGUOUS_PA=1 reads each KV block for "
        "one sequence only, so blocks cannot be shared; set VLLM_CONTIGUOUS_PA=0 to keep "
        "prefix caching",
    ]
    assert isinstance(platform().free_block_policy(config), LowestIdFirst)


def test_without_contiguous_pa_prefix_caching_and_a_chosen_block_size_stay() -> None:
    hpu = platform(VLLM_CONTIGUOUS_PA="0")
    config, reasons = hpu.check_config(engine_config(block_size=64))
    assert (config, reasons) == (engine_config(block_size=64), [])
    assert hpu.free_block_policy(config) is None


def test_a_dtype_gaudi_lacks_is_refused() -> None:
    with pytest.raises(KvrunError) as info:
        platform().check_config(engine_config(dtype=torch.float16))
    assert str(info.value) == (
        "dtype float16 is not supported on the hpu platform; supported: bfloat16, float32"
    )


def test_attention_backend_follows_vllm_contiguous_pa() -> None:
    spec = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, scale=0.5)
    default = platform().attention_backend(None, spec)
    assert isinstance(default, HpuFlatAttention) and default.contiguous
    flat = platform(VLLM_CONTIGUOUS_PA="false").attention_backend("HPU_ATTN", spec)
    assert isinstance(flat, HpuFlatAttention) and not flat.contiguous
    assert isinstance(platform().attention_backend("REFERENCE", spec), ReferenceAttention)
    with pytest.raises(ConfigError) as info:
        platform().attention_backend("FLASH_ATTN", spec)
    assert str(info.value) == (
        "VLLM_ATTENTION_BACKEND='FLASH_ATTN' is not offered by the hpu platform; valid "
        "backends are: HPU_ATTN, REFERENCE"
    )
    assert platform().describe() == "hpu (hpu, contiguous paged attention)"
