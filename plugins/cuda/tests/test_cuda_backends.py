"""kvrun-cuda attention choice: exact errors for backends that cannot run, the automatic order."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun_cuda.backends import (
    CUDA_BACKENDS,
    FLASHINFER,
    FP8_BACKENDS,
    REFERENCE_FP8,
    TRITON_ATTN,
    TRITON_FP8,
    XFORMERS,
    build_backend,
    choose_attention_backend,
    choose_fp8_backend,
    refusals,
)
from kvrun_cuda.flashinfer_attn import FlashInferAttention
from kvrun_cuda.fp8 import Fp8KVCacheAttention
from kvrun_cuda.platform import CudaPlatform, check_backend_dtype

SPEC = AttentionLayerSpec(num_heads=8, num_kv_heads=2, head_dim=64, scale=0.125)
ODD_HEAD = AttentionLayerSpec(num_heads=4, num_kv_heads=4, head_dim=72, scale=72**-0.5)
EVERYTHING = frozenset({"flashinfer", "xformers", "triton"}).__contains__
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
FLASHINFER_MISSING = (
    "flashinfer-python is not installed (module 'flashinfer' not found; "
    "pip install flashinfer-python)"
)


@pytest.mark.skipif(HAS_FLASHINFER, reason="flashinfer is installed here")
def test_asking_for_flashinfer_without_the_package_is_an_error() -> None:
    platform = CudaPlatform(read_env({}))
    with pytest.raises(ConfigError) as err:
        platform.attention_backend("FLASHINFER", SPEC)
    assert str(err.value) == (
        f"VLLM_ATTENTION_BACKEND=FLASHINFER cannot run on the cuda platform: "
        f"{FLASHINFER_MISSING}; unset VLLM_ATTENTION_BACKEND to let kvrun choose"
    )


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed here")
def test_an_error_lists_every_reason() -> None:
    with pytest.raises(ConfigError) as err:
        choose_attention_backend("XFORMERS", ODD_HEAD, torch.float32, CUDA_BACKENDS, "cuda")
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND=XFORMERS cannot run on the cuda platform: xformers is not "
        "installed (module 'xformers' not found; pip install xformers); head size 72 is not "
        "supported (supported: 64, 80, 96, 112, 128, 256); dtype float32 is not supported "
        "(supported: float16, bfloat16); unset VLLM_ATTENTION_BACKEND to let kvrun choose"
    )


def test_head_size_and_dtype_refused_even_when_installed() -> None:
    assert refusals(FLASHINFER, ODD_HEAD, torch.float16, EVERYTHING) == [
        "head size 72 is not supported (supported: 64, 128, 256)"
    ]
    assert refusals(FLASHINFER, SPEC, torch.float32, EVERYTHING) == [
        "dtype float32 is not supported (supported: float16, bfloat16)"
    ]
    assert refusals(TRITON_ATTN, ODD_HEAD, torch.float32, EVERYTHING) == []
    with pytest.raises(ConfigError) as err:
        choose_attention_backend("FLASHINFER", ODD_HEAD, None, CUDA_BACKENDS, "cuda", EVERYTHING)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND=FLASHINFER cannot run on the cuda platform: head size 72 is "
        "not supported (supported: 64, 128, 256); unset VLLM_ATTENTION_BACKEND to let kvrun "
        "choose"
    )


def test_unknown_backend_name() -> None:
    platform = CudaPlatform(read_env({}))
    with pytest.raises(ConfigError) as err:
        platform.attention_backend("FLASH_ATTN", SPEC)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND='FLASH_ATTN' is not offered by the cuda platform; valid "
        "backends are: FLASHINFER, REFERENCE, TRITON_ATTN, XFORMERS"
    )


def test_names_are_case_insensitive() -> None:
    choice = choose_attention_backend("triton_attn", SPEC, None, CUDA_BACKENDS, "cuda", EVERYTHING)
    assert (choice.entry, choice.explicit, choice.passed_over) == (TRITON_ATTN, True, ())
    assert choice.log_line("cuda") == "cuda: attention backend TRITON_ATTN (asked for)"


def test_automatic_order_and_what_it_passed_over() -> None:
    assert choose_attention_backend(None, SPEC, None, CUDA_BACKENDS, "cuda", EVERYTHING).entry == (
        FLASHINFER
    )
    odd = choose_attention_backend(None, ODD_HEAD, None, CUDA_BACKENDS, "cuda", EVERYTHING)
    assert odd.entry == TRITON_ATTN
    assert odd.log_line("cuda") == (
        "cuda: attention backend TRITON_ATTN chosen automatically, passed over FLASHINFER: "
        "head size 72 is not supported (supported: 64, 128, 256); XFORMERS: head size 72 is "
        "not supported (supported: 64, 80, 96, 112, 128, 256)"
    )
    only_triton = choose_attention_backend(
        None, SPEC, None, CUDA_BACKENDS, "cuda", frozenset({"triton"}).__contains__
    )
    assert only_triton.entry == TRITON_ATTN
    assert [name for name, _ in only_triton.passed_over] == ["FLASHINFER", "XFORMERS"]
    nothing = choose_attention_backend(None, SPEC, None, CUDA_BACKENDS, "cuda", lambda m: False)
    assert nothing.entry.name == "REFERENCE"
    assert nothing.passed_over[-1] == (
        "TRITON_ATTN",
        "triton is not installed (module 'triton' not found; pip install triton)",
    )


def test_the_automatic_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    platform = CudaPlatform(read_env({"VLLM_ATTENTION_BACKEND": "REFERENCE"}))
    with caplog.at_level(logging.INFO, logger="kvrun.cuda"):
        backend = platform.attention_backend("REFERENCE", SPEC)
    assert isinstance(backend, ReferenceAttention)
    assert platform.attention_backend("REFERENCE", SPEC) is backend  # shared by all layers
    assert [r.getMessage() for r in caplog.records] == [
        "cuda: attention backend REFERENCE (asked for)"
    ]


def test_flashinfer_tensor_cores_follow_the_variable_or_the_group_size() -> None:
    forced = build_backend(
        FLASHINFER,
        AttentionLayerSpec(4, 4, 64, 0.125),
        read_env({"VLLM_FLASHINFER_FORCE_TENSOR_CORES": "1"}),
    )
    assert isinstance(forced, FlashInferAttention) and forced.use_tensor_cores
    plain = build_backend(FLASHINFER, AttentionLayerSpec(4, 4, 64, 0.125), read_env({}))
    assert isinstance(plain, FlashInferAttention) and not plain.use_tensor_cores
    grouped = build_backend(FLASHINFER, SPEC, read_env({}))  # 4 query heads per KV head
    assert isinstance(grouped, FlashInferAttention) and grouped.use_tensor_cores
    assert FlashInferAttention.kv_cache_shape(10, 16, 2, 64) == (10, 2, 16, 2, 64)


def test_the_model_dtype_is_checked_once_known() -> None:
    check_backend_dtype(CUDA_BACKENDS, "FLASHINFER", torch.bfloat16)
    check_backend_dtype(CUDA_BACKENDS, "TRITON_ATTN", torch.float32)
    with pytest.raises(ConfigError) as err:
        check_backend_dtype(CUDA_BACKENDS, "FLASHINFER", torch.float32)
    assert str(err.value) == (
        "attention backend FLASHINFER does not run dtype float32 (it runs: float16, "
        "bfloat16); choose one of those dtypes, or a backend that runs float32 with "
        "VLLM_ATTENTION_BACKEND (TRITON_ATTN, REFERENCE)"
    )
    assert XFORMERS.dtypes == (torch.float16, torch.bfloat16)


def test_triton_head_sizes_are_a_range() -> None:
    big = AttentionLayerSpec(num_heads=2, num_kv_heads=2, head_dim=320, scale=0.05)
    assert refusals(TRITON_ATTN, big, torch.float16, EVERYTHING) == [
        "head size 320 is not supported (supported: 1..256)"
    ]
    auto = choose_attention_backend(None, big, None, CUDA_BACKENDS, "cuda", EVERYTHING)
    assert auto.entry.name == "REFERENCE"


# --- fp8 KV cache ------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_SPEC = AttentionLayerSpec(8, 2, 64, 0.125, dtype=torch.float16, kv_cache_dtype=FP8)
TRITON_MISSING = "triton is not installed (module 'triton' not found; pip install triton)"


def test_fp8_automatic_choice_is_triton_then_the_torch_path() -> None:
    assert [e.name for e in FP8_BACKENDS] == ["TRITON_ATTN", "REFERENCE_FP8"]
    triton = choose_fp8_backend(None, FP8_SPEC, FP8_BACKENDS, "cuda", EVERYTHING)
    assert (triton.entry, triton.explicit) == (TRITON_FP8, False)
    assert triton.log_line("cuda", FP8) == (
        "cuda: attention backend TRITON_ATTN over a float8_e4m3fn KV cache chosen automatically"
    )
    torch_path = choose_fp8_backend(None, FP8_SPEC, FP8_BACKENDS, "cuda", lambda m: False)
    assert torch_path.entry == REFERENCE_FP8
    assert torch_path.log_line("cuda", FP8) == (
        "cuda: attention backend REFERENCE_FP8 over a float8_e4m3fn KV cache chosen "
        f"automatically, passed over TRITON_ATTN: {TRITON_MISSING}"
    )
    big = AttentionLayerSpec(2, 2, 320, 0.05, dtype=torch.float16, kv_cache_dtype=FP8)
    too_big = choose_fp8_backend(None, big, FP8_BACKENDS, "cuda", EVERYTHING)
    assert too_big.entry == REFERENCE_FP8
    assert too_big.passed_over == (
        ("TRITON_ATTN", "head size 320 is not supported (supported: 1..256)"),
    )


def test_fp8_named_backends_run_or_say_why_not() -> None:
    triton = choose_fp8_backend("triton_attn", FP8_SPEC, FP8_BACKENDS, "cuda", EVERYTHING)
    assert (triton.entry, triton.explicit) == (TRITON_FP8, True)
    assert triton.log_line("cuda", FP8) == (
        "cuda: attention backend TRITON_ATTN over a float8_e4m3fn KV cache (asked for)"
    )
    named = choose_fp8_backend("REFERENCE_FP8", FP8_SPEC, FP8_BACKENDS, "cuda", EVERYTHING)
    assert (named.entry, named.explicit) == (REFERENCE_FP8, True)
    with pytest.raises(ConfigError) as err:
        choose_fp8_backend("TRITON_ATTN", FP8_SPEC, FP8_BACKENDS, "cuda", lambda m: False)
    assert str(err.value) == (
        f"VLLM_ATTENTION_BACKEND=TRITON_ATTN cannot run on the cuda platform: {TRITON_MISSING}; "
        "unset VLLM_ATTENTION_BACKEND to let kvrun choose"
    )
    for other in ("FLASHINFER", "xformers", "REFERENCE", "FLASH_ATTN"):
        with pytest.raises(ConfigError) as err:
            choose_fp8_backend(other, FP8_SPEC, FP8_BACKENDS, "cuda", EVERYTHING)
        assert str(err.value) == (
            f"VLLM_ATTENTION_BACKEND={other!r} cannot read an fp8 KV cache on the cuda "
            "platform; with kv_cache_dtype fp8 the backends are REFERENCE_FP8, TRITON_ATTN: "
            "unset VLLM_ATTENTION_BACKEND, name one of those, or use kv_cache_dtype=auto"
        )


def test_the_fp8_choice_is_logged_and_built_with_the_env_scales(
    caplog: pytest.LogCaptureFixture,
) -> None:
    platform = CudaPlatform(read_env({"K_SCALE_CONSTANT": "50", "V_SCALE_CONSTANT": "25"}))
    with caplog.at_level(logging.INFO, logger="kvrun.cuda"):
        backend = platform.attention_backend("reference_fp8", FP8_SPEC)
    assert isinstance(backend, Fp8KVCacheAttention)
    assert (backend.scales.k_scale_constant, backend.scales.v_scale_constant) == (50, 25)
    assert platform.attention_backend("REFERENCE_FP8", FP8_SPEC) is backend
    assert [r.getMessage() for r in caplog.records] == [
        "cuda: attention backend REFERENCE_FP8 over a float8_e4m3fn KV cache (asked for)"
    ]
