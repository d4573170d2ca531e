"""CpuPlatform: backend selection, the KV-cache budget, kernels and the start-up line."""

from __future__ import annotations

import functools
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.host_cpu import host_cpu
from kvrun.platforms import KVCacheRequest
from kvrun_cpu.attention import TorchSdpaAttention
from kvrun_cpu.native.build import default_isa, supported_isas
from kvrun_cpu.ops import cpu_ops
from kvrun_cpu.platform import CpuPlatform

SPEC = AttentionLayerSpec(num_heads=9, num_kv_heads=3, head_dim=64, scale=0.125)


Make = Callable[..., CpuPlatform]


@pytest.fixture
def platform(tmp_path: Path) -> Make:
    """CpuPlatform over the given variables, its caches under a fresh VLLM_CACHE_ROOT."""

    def make(**env: str) -> CpuPlatform:
        return CpuPlatform(read_env({"VLLM_CACHE_ROOT": str(tmp_path / "cache"), **env}))

    return make


def request(max_model_len: int = 8192) -> KVCacheRequest:
    # SmolLM2-135M: 30 layers, 3 kv heads of 64.
    return KVCacheRequest(
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        max_model_len=max_model_len,
        layer_shape=lambda n: TorchSdpaAttention.kv_cache_shape(n, 16, 3, 64),
    )


def test_backends_offered_and_the_default(platform: Make) -> None:
    cpu = platform()
    assert dict(cpu.attention_backends()) == {
        "REFERENCE": ReferenceAttention,
        "TORCH_SDPA": TorchSdpaAttention,
    }
    assert type(cpu.attention_backend(None, SPEC)) is TorchSdpaAttention
    assert type(cpu.attention_backend("REFERENCE", SPEC)) is ReferenceAttention


def test_layers_with_one_spec_share_one_backend(platform: Make) -> None:
    cpu = platform()
    first = cpu.attention_backend(None, SPEC)
    assert cpu.attention_backend("TORCH_SDPA", SPEC) is first
    other = AttentionLayerSpec(num_heads=4, num_kv_heads=4, head_dim=64, scale=0.125)
    assert cpu.attention_backend(None, other) is not first


def test_unknown_attention_backend_lists_the_valid_ones(platform: Make) -> None:
    with pytest.raises(ConfigError) as err:
        platform().attention_backend("FLASH_ATTN", SPEC)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND='FLASH_ATTN' is not offered by the cpu platform; "
        "valid backends are: REFERENCE, TORCH_SDPA"
    )


def test_kv_cache_default_budget_is_4_gib(platform: Make) -> None:
    plan = platform().plan_kv_cache(request())
    assert plan.budget_bytes == 4 << 30
    assert plan.num_blocks == (4 << 30) // (2 * 30 * 16 * 3 * 64 * 4)  # 5825
    assert plan.layer_shape == (2, 3, 5825, 16, 64)
    assert plan.reason == "VLLM_CPU_KVCACHE_SPACE unset or 0: the default 4 GiB"


def test_kv_cache_budget_from_the_variable(platform: Make) -> None:
    plan = platform(VLLM_CPU_KVCACHE_SPACE="0.5").plan_kv_cache(request())
    assert (plan.budget_bytes, plan.num_blocks) == (1 << 29, 728)
    assert plan.reason == "VLLM_CPU_KVCACHE_SPACE=0.5 GiB"


def test_kv_cache_budget_too_small_for_one_sequence_is_refused(platform: Make) -> None:
    with pytest.raises(ConfigError) as err:
        platform(VLLM_CPU_KVCACHE_SPACE="0.001").plan_kv_cache(request())
    assert str(err.value) == (
        "the cpu KV-cache budget of 0.001 GiB (VLLM_CPU_KVCACHE_SPACE=0.001 GiB) holds 1 blocks "
        "of 16 tokens, but one sequence of max_model_len=8192 needs 512; raise the budget "
        "(to 0.352 GiB) or lower max_model_len"
    )


def test_allocated_cache_has_the_backend_layout(platform: Make) -> None:
    cpu = platform(VLLM_CPU_KVCACHE_SPACE="0.01")
    plan = cpu.plan_kv_cache(request(max_model_len=64))
    caches = cpu.allocate_kv_cache(plan, 2)
    assert [c.shape for c in caches] == [torch.Size((2, 3, plan.num_blocks, 16, 64))] * 2


def test_ops_are_the_cpu_kernels_with_the_native_kernels_bound(platform: Make) -> None:
    cpu = platform()
    got, want = dict(cpu.ops()), dict(cpu_ops(cpu.native_kernels()))

    def unbound(fn: object) -> object:  # functools.partial compares by identity
        return (fn.func, fn.keywords) if isinstance(fn, functools.partial) else fn

    assert {k: unbound(f) for k, f in got.items()} == {k: unbound(f) for k, f in want.items()}


def test_describe_names_the_cpu_its_features_isa_threads_and_cores(platform: Make) -> None:
    line = platform().describe()
    isa = torch.backends.cpu.get_cpu_capability()
    cpu = host_cpu()
    assert line.startswith(f"cpu ({cpu.model}: ")
    assert re.fullmatch(
        rf"cpu \({re.escape(cpu.describe())}; torch {isa}; {torch.get_num_threads()} threads "
        r"on cores [0-9,-]+\)",
        line,
    )
    assert (" (AMX tiles " in line) == cpu.has("AMX_BF16")  # Linux's answer where it matters
    # The features torch itself sees agree with the ones read from /proc/cpuinfo.
    assert cpu.has("AVX512_BF16") == torch.cpu._is_avx512_bf16_supported()
    assert cpu.has("AMX_BF16") == torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="no C compiler")
def test_torch_sdpa_gets_the_native_kernels(platform: Make, tmp_path: Path) -> None:
    cpu = platform()
    backend = cpu.attention_backend(None, SPEC)
    assert isinstance(backend, TorchSdpaAttention)
    assert backend.native is not None and backend.native is cpu.native_kernels()
    assert len(list((tmp_path / "cache" / "kvrun_cpu").glob("kvrun_cpu_native_*.so"))) == 1
    assert cpu.describe().endswith(f"; native kernels {default_isa()})")


def test_the_install_time_variables_reach_the_native_build(
    platform: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = platform(CMAKE_BUILD_TYPE="RelWithDebInfo", VERBOSE="1", NVCC_THREADS="4")
    with caplog.at_level(logging.INFO, logger="kvrun.cpu"):
        assert cpu.native_kernels() is not None
    messages = [r.getMessage() for r in caplog.records]
    built = [m for m in messages if m.startswith("native build: ")]
    assert built and all(" -O2 -g " in m for m in built)  # VERBOSE logged each command
    (lib,) = (tmp_path / "cache" / "kvrun_cpu").glob("kvrun_cpu_native_*.so")
    assert b".debug_info" in lib.read_bytes()


def test_torch_sdpa_falls_back_to_torch_when_the_kernels_cannot_be_built(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cpu = CpuPlatform(read_env({"VLLM_CACHE_ROOT": str(blocker)}))
    with caplog.at_level(logging.WARNING, logger="kvrun.cpu"):
        backend = cpu.attention_backend(None, SPEC)
    assert isinstance(backend, TorchSdpaAttention) and backend.native is None
    (record,) = caplog.records
    assert record.getMessage().startswith(
        f"native kernels unavailable, using torch: could not build in {blocker / 'kvrun_cpu'}: "
    ) or record.getMessage() == (
        "native kernels unavailable, using torch: no C compiler (cc, gcc or clang) on PATH"
    )
    assert cpu.describe().endswith("; torch kernels)")
    assert dict(cpu.ops()) == dict(cpu_ops(None))  # every op on its torch path


def test_auto_dtype_is_bfloat16_where_the_native_kernels_run_it(
    platform: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cpu = platform()
    with caplog.at_level(logging.INFO, logger="kvrun.cpu"):
        dtype = cpu.default_dtype()
        assert cpu.default_dtype() == dtype  # decided once
    native = cpu.native_kernels()
    assert native is not None
    hardware_bf16 = native.isa in ("AMX_BF16", "AVX512_BF16")
    assert dtype == (torch.bfloat16 if hardware_bf16 else torch.float32)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dtype=auto")]
    assert said == [
        f"dtype=auto is bfloat16 on cpu: the native kernels run bf16 in hardware ({native.isa})"
        if hardware_bf16
        else f"dtype=auto is float32 on cpu: no hardware bf16 (the native kernels are built "
        f"for {native.isa})"
    ]


def test_auto_dtype_is_float32_without_the_native_kernels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cpu = CpuPlatform(read_env({"VLLM_CACHE_ROOT": str(blocker)}))
    with caplog.at_level(logging.INFO, logger="kvrun.cpu"):
        assert cpu.default_dtype() == torch.float32
    assert caplog.records[-1].getMessage() == (
        "dtype=auto is float32 on cpu: no hardware bf16 (the native kernels are unavailable)"
    )


def test_native_kernels_are_built_for_the_widest_isa(platform: Make) -> None:
    native = platform().native_kernels()
    assert native is not None and native.isa == supported_isas()[0]
    assert f"_{native.isa}_" in native.library.name
