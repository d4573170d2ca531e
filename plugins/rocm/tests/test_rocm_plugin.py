"""kvrun-rocm: identity, the probe's answer, attention choice, the fp8 KV-cache format and
fp8 weight padding."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.engine.batch import build_batch
from kvrun.env_effects import ineffective
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.platforms import Unavailable
from kvrun.platforms.memory import device_memory_budget
from kvrun.scheduling.output import ScheduledChunk
from kvrun_cuda.backends import build_backend, choose_attention_backend
from kvrun_rocm import probe
from kvrun_rocm.fp8_padding import pad_fp8_weight
from kvrun_rocm.platform import (
    ROCM_BACKENDS,
    ROCM_TRITON_ATTN,
    RocmPlatform,
    fp8_kv_dtype,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None

GiB = 1 << 30


def test_identity() -> None:
    assert (RocmPlatform.name, RocmPlatform.device_type, RocmPlatform.dist_backend) == (
        "rocm",
        "cuda",
        "nccl",
    )
    assert RocmPlatform.priority == 90


@pytest.mark.skipif(torch.version.hip is not None, reason="torch here is a ROCm build")
def test_probe_on_a_non_rocm_torch() -> None:
    assert probe() == Unavailable(
        f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None)"
    )


def test_budget() -> None:
    budget, reason = device_memory_budget(190 * GiB, 192 * GiB, 16 * GiB, "rocm:0")
    assert budget == int(192 * GiB * 0.9) - 16 * GiB
    assert reason == "0.9 of 192.00 GiB on rocm:0 minus 16.00 GiB of weights"


# --- attention choice -------------------------------------------------------------------

SPEC = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=64, scale=0.125)


def test_rocm_offers_triton_and_the_reference_only() -> None:
    platform = RocmPlatform(read_env({}))
    with pytest.raises(ConfigError) as err:
        platform.attention_backend("FLASHINFER", SPEC)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND='FLASHINFER' is not offered by the rocm platform; valid "
        "backends are: REFERENCE, TRITON_ATTN"
    )
    assert isinstance(platform.attention_backend("REFERENCE", SPEC), ReferenceAttention)


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed here")
def test_asking_for_triton_without_triton() -> None:
    with pytest.raises(ConfigError) as err:
        RocmPlatform(read_env({})).attention_backend("TRITON_ATTN", SPEC)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND=TRITON_ATTN cannot run on the rocm platform: triton is not "
        "installed (module 'triton' not found; pip install triton); unset "
        "VLLM_ATTENTION_BACKEND to let kvrun choose"
    )


def test_the_automatic_choice_prefers_triton() -> None:
    choice = choose_attention_backend(
        None, SPEC, None, ROCM_BACKENDS, "rocm", frozenset({"triton"}).__contains__
    )
    assert choice.entry == ROCM_TRITON_ATTN
    fallback = choose_attention_backend(None, SPEC, None, ROCM_BACKENDS, "rocm", lambda m: False)
    assert fallback.log_line("rocm") == (
        "rocm: attention backend REFERENCE chosen automatically, passed over TRITON_ATTN: "
        "triton is not installed (module 'triton' not found; pip install triton)"
    )
    assert ROCM_TRITON_ATTN.env_options == (
        ("use_triton_flash_attn", "VLLM_USE_TRITON_FLASH_ATTN"),
    )
    assert read_env({}).VLLM_USE_TRITON_FLASH_ATTN is True


# --- fp8 KV cache ------------------------------------------------------------------------


def test_mi300_stores_fp8_as_e4m3fnuz_and_other_gpus_as_e4m3fn() -> None:
    fnuz, ocp = torch.float8_e4m3fnuz, torch.float8_e4m3fn
    for arch in ("gfx942:sramecc+:xnack-", "gfx942", "gfx941:sramecc+:xnack-", "gfx940"):
        assert fp8_kv_dtype(arch) == fnuz, arch
    for arch in ("gfx950:sramecc+:xnack-", "gfx90a:sramecc+:xnack-", "gfx1100", "gfx1201", ""):
        assert fp8_kv_dtype(arch) == ocp, arch


def with_arch(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """The current device reports ``arch`` (what torch's ROCm build reads from HIP)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(gcnArchName=arch)
    )


def test_kv_cache_dtype_fp8_follows_the_device_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    platform = RocmPlatform(read_env({}))
    with_arch(monkeypatch, "gfx942:sramecc+:xnack-")
    assert platform.resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fnuz
    assert platform.resolve_kv_cache_dtype("fp8_e4m3", torch.float16) == torch.float8_e4m3fnuz
    assert platform.resolve_kv_cache_dtype("auto", torch.float16) is None
    with_arch(monkeypatch, "gfx950:sramecc+:xnack-")
    assert platform.resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    with pytest.raises(ConfigError) as err:
        platform.resolve_kv_cache_dtype("fp8_e5m2", torch.float16)
    assert str(err.value) == (
        "kv_cache_dtype='fp8_e5m2' is not supported on the rocm platform; "
        "supported: auto, fp8, fp8_e4m3"
    )


def test_an_fnuz_cache_is_read_by_the_fp8_backends() -> None:
    platform = RocmPlatform(read_env({}))
    spec = AttentionLayerSpec(4, 2, 64, 0.125, torch.float16, torch.float8_e4m3fnuz)
    reference = platform.attention_backend("REFERENCE_FP8", spec)
    assert reference.name == "REFERENCE_FP8"
    with pytest.raises(ConfigError) as err:
        platform.attention_backend("REFERENCE", spec)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND='REFERENCE' cannot read an fp8 KV cache on the rocm "
        "platform; with kv_cache_dtype fp8 the backends are REFERENCE_FP8, TRITON_ATTN: "
        "unset VLLM_ATTENTION_BACKEND, name one of those, or use kv_cache_dtype=auto"
    )
    if HAS_TRITON:
        from kvrun_cuda.triton.attention import TritonFp8Attention

        assert isinstance(platform.attention_backend(None, spec), TritonFp8Attention)


# --- VLLM_ROCM_FP8_PADDING --------------------------------------------------------------


def test_fp8_rows_with_a_512_byte_pitch_get_256_more_bytes() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 512).to(torch.float8_e4m3fn)  # 512-byte rows
    padded = pad_fp8_weight(weight, enabled=True)
    assert padded.shape == weight.shape and padded.dtype == weight.dtype
    assert padded.stride() == (768, 1)
    assert torch.equal(padded.float(), weight.float())
    wide = torch.randn(2, 3, 1024).to(torch.float8_e4m3fn)
    assert pad_fp8_weight(wide, enabled=True).stride() == (3 * 1280, 1280, 1)
    halves = torch.randn(3, 256, dtype=torch.bfloat16)  # 512 bytes of 2-byte elements
    assert pad_fp8_weight(halves, enabled=True).stride() == (384, 1)


def test_fp8_padding_leaves_other_weights_alone() -> None:
    weight = torch.randn(4, 384).to(torch.float8_e4m3fn)  # 384-byte rows: no conflict
    assert pad_fp8_weight(weight, enabled=True) is weight
    aligned = torch.randn(4, 512).to(torch.float8_e4m3fn)
    assert pad_fp8_weight(aligned, enabled=False) is aligned
    assert pad_fp8_weight(aligned.t(), enabled=True).stride() == aligned.t().stride()
    vector = torch.randn(512).to(torch.float8_e4m3fn)
    assert pad_fp8_weight(vector, enabled=True) is vector


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the shared Triton backend imports it)")
def test_without_triton_flash_attn_prefill_runs_the_torch_path() -> None:
    from kvrun_rocm.attention import RocmTritonAttention

    backend = build_backend(ROCM_TRITON_ATTN, SPEC, read_env({"VLLM_USE_TRITON_FLASH_ATTN": "0"}))
    assert isinstance(backend, RocmTritonAttention) and not backend.use_triton_flash_attn
    assert RocmTritonAttention.kv_cache_shape(5, 16, 2, 64) == (2, 5, 16, 2, 64)
    torch.manual_seed(0)
    chunks = [
        ScheduledChunk("a", list(range(5)), 0, [2], True, True),
        ScheduledChunk("b", list(range(3)), 0, [0], True, True),
    ]
    meta = build_batch(chunks, 16, torch.device("cpu")).meta
    q = torch.randn(8, 4, 64)
    k, v = torch.randn(8, 2, 64), torch.randn(8, 2, 64)
    cache, ref_cache = torch.zeros(2, 3, 16, 2, 64), torch.zeros(2, 3, 16, 2, 64)
    got = backend.forward(q, k, v, cache, meta)
    want = ReferenceAttention(SPEC).forward(q, k, v, ref_cache, meta)
    assert torch.equal(got, want) and torch.equal(cache, ref_cache)


def test_fp8_padding_set_by_hand_is_named_as_having_nothing_to_pad() -> None:
    assert ineffective(read_env({}), "rocm", "offline") == []  # the default (1) is no news
    ((name, why),) = ineffective(read_env({"VLLM_ROCM_FP8_PADDING": "0"}), "rocm", "offline")
    assert name == "VLLM_ROCM_FP8_PADDING"
    assert why.startswith("kvrun loads no fp8 weights yet, so there is nothing to pad")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the shared Triton backend imports it)")
@pytest.mark.parametrize("flash", [True, False], ids=["triton-prefill", "torch-prefill"])
def test_the_latent_cache_variant_reaches_both_paths(
    flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """variant(latent_value_dim=...) (what the engine builder asks for DeepSeek) gives the
    Triton and the torch path the latent spec: one plane, the scenarios' outputs the
    reference's."""
    from kvrun.testing.attention_checks import SCENARIOS, check_backend
    from kvrun_rocm.attention import RocmTritonAttention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plain = RocmTritonAttention(AttentionLayerSpec(4, 1, 48, 48**-0.5), flash)
    latent = plain.variant(latent_value_dim=32)
    assert isinstance(latent, RocmTritonAttention)
    assert latent.triton.spec.latent_value_dim == latent.torch_path.spec.latent_value_dim == 32
    assert plain.triton.spec.latent_value_dim is None  # the original keeps its spec
    assert latent.layer_cache_shape(5, 16, 1, 48) == (1, 5, 16, 1, 48)
    for scenario in SCENARIOS:
        check_backend(latent, scenario, torch.float32, torch.device("cpu"))
