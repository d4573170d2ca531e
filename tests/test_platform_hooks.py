"""The optional Platform hooks GPU plugins use, driven through real engines.

tests/fixtures/hooks is a real distribution with two host platforms: "fixturehooks"
uses every hook (memory profiling, an fp8 KV cache, a padded decode runner with a
reserved KV block, a platform sampler, its own default block size) and "fixtureplain"
is the same platform without the decode runner, reserve and sampler, so both must
generate the same tokens. The cpu platform shows the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kvrun.config import EngineArgs
from kvrun.engine.builder import build_engine_parts
from kvrun.engine.llm_engine import LLMEngine
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.sampling import Sampler, SamplingRow, build_sampling_metadata, make_generator
from kvrun.sampling_params import SamplingParams
from tests.support.engine import make_engine, run_all
from tests.support.fixture_plugins import install_fixture_plugins

NEW_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
# Small enough that the profiling forward and the cache stay tiny.
ENGINE_KW: dict[str, Any] = dict(
    dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64
)


@pytest.fixture(scope="module")
def fixture_platform() -> Iterator[ModuleType]:
    """The fixture on sys.path for this module; yields its platform module."""
    site = str(install_fixture_plugins(["hooks"]))
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("kvrun_fixture_hooks.platform")
    finally:
        sys.path.remove(site)
        for name in [m for m in sys.modules if m.startswith("kvrun_fixture_hooks")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def model_dir(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2, num_kv_heads=2)


def fixture_engine(model_dir: Path, device: str, **kwargs: Any) -> LLMEngine:
    environ = {**os.environ, "VLLM_TARGET_DEVICE": device}
    return LLMEngine.from_args(
        EngineArgs(model=str(model_dir), **{**ENGINE_KW, **kwargs}), read_env(environ)
    )


def bytes_per_block(model_dir: Path, block_size: int, elem: int) -> int:
    hf = json.loads((model_dir / "config.json").read_text())
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    layers, kv_heads = int(hf["num_hidden_layers"]), int(hf["num_key_value_heads"])
    return 2 * layers * block_size * kv_heads * head_dim * elem


@pytest.fixture(scope="module")
def hooked(fixture_platform: ModuleType, model_dir: Path) -> LLMEngine:
    return fixture_engine(model_dir, "fixturehooks", gpu_memory_utilization=0.5)


@pytest.fixture(scope="module")
def plain(fixture_platform: ModuleType, model_dir: Path) -> LLMEngine:
    return fixture_engine(model_dir, "fixtureplain", gpu_memory_utilization=0.5)


# --- options ----------------------------------------------------------------------------


def test_new_engine_options_are_validated() -> None:
    for value in (0.0, 1.5):
        with pytest.raises(ConfigError) as info:
            EngineArgs(gpu_memory_utilization=value)
        assert str(info.value) == (
            f"gpu_memory_utilization={value} is out of range; accepted: 0 < value <= 1"
        )
    with pytest.raises(ConfigError) as info:
        EngineArgs(kv_cache_dtype="int8")
    assert str(info.value) == (
        "kv_cache_dtype 'int8' is not known; accepted: auto, fp8, fp8_e4m3, fp8_e5m2"
    )
    with pytest.raises(ConfigError) as info:
        EngineArgs(block_size=0)
    assert str(info.value) == "block_size must be >= 1 when given, got 0"


def test_cli_flags_for_the_new_options() -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    defaults = EngineArgs.from_cli_args(parser.parse_args([]))
    assert (defaults.block_size, defaults.gpu_memory_utilization, defaults.kv_cache_dtype) == (
        None,
        0.9,
        "auto",
    )
    args = EngineArgs.from_cli_args(
        parser.parse_args(
            ["--block-size", "32", "--gpu-memory-utilization", "0.75", "--kv-cache-dtype", "fp8"]
        )
    )
    assert (args.block_size, args.gpu_memory_utilization, args.kv_cache_dtype) == (
        32,
        0.75,
        "fp8",
    )


# --- the defaults, on the cpu platform ------------------------------------------------------


def test_the_cpu_platform_keeps_the_defaults(model_dir: Path) -> None:
    engine = make_engine(model_dir, max_model_len=64, num_kv_blocks=40)
    platform = engine.platform
    ran: list[int] = []
    assert platform.measure_peak_memory(lambda: ran.append(1)) is None
    assert ran == []  # the default runs nothing
    assert platform.reserved_kv_blocks(engine.config) == 0
    assert platform.top_k_top_p_sampler() is None
    assert engine.runner.decode_graph is None
    assert (engine.config.block_size, engine.config.kv_cache_dtype) == (16, None)
    assert engine.config.num_kv_blocks == 40
    assert engine.scheduler.block_manager.num_blocks == 40


def test_the_cpu_platform_refuses_an_fp8_cache(model_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_engine(model_dir, max_model_len=64, kv_cache_dtype="fp8")
    assert str(info.value) == (
        "kv_cache_dtype='fp8' is not supported on the cpu platform; supported: auto"
    )


# --- profiling, block size, reserved block, decode runner ------------------------------------


def test_profiling_budgets_utilization_times_total_minus_the_peak(
    fixture_platform: ModuleType, hooked: LLMEngine, model_dir: Path
) -> None:
    config = hooked.config
    assert config.block_size == 8  # the fixture platform's default_block_size
    assert hooked.platform.profile_runs == 1  # type: ignore[attr-defined]
    budget = int(fixture_platform.DEVICE_BYTES * 0.5) - fixture_platform.PEAK_BYTES
    planned = budget // bytes_per_block(model_dir, 8, elem=4)
    # One block is reserved for the decode runner's padding rows.
    assert config.num_kv_blocks == planned - 1
    assert hooked.scheduler.block_manager.num_blocks == planned - 1
    assert hooked.runner.kv_caches[0].shape[1] == planned  # the reference layout [2, n, ...]


def test_the_model_dtype_reaches_the_attention_spec(hooked: LLMEngine) -> None:
    specs = hooked.platform.specs  # type: ignore[attr-defined]
    assert [(s.dtype, s.kv_cache_dtype) for s in specs] == [(torch.float32, None)]


def test_padded_decode_runner_matches_the_eager_platform(
    hooked: LLMEngine, plain: LLMEngine
) -> None:
    expected = [o.outputs[0].token_ids for o in run_all(plain, PROMPTS, GREEDY)]
    got = [o.outputs[0].token_ids for o in run_all(hooked, PROMPTS, GREEDY)]
    assert got == expected
    assert plain.runner.decode_graph is None
    runner: Any = hooked.platform.decode_runner  # type: ignore[attr-defined]
    # Every decode step of the three requests was run by the runner, padded to 4 rows,
    # and the padding rows wrote the reserved block: the last one, beyond the scheduler's.
    assert runner.padded_sizes == [4] * (NEW_TOKENS - 1)
    assert runner.pad_slot == hooked.config.num_kv_blocks * hooked.config.block_size
    assert hooked.runner.decode_graph is runner


def test_an_explicit_block_size_is_kept_and_num_kv_blocks_skips_profiling(
    fixture_platform: ModuleType, model_dir: Path
) -> None:
    args = EngineArgs(model=str(model_dir), block_size=16, num_kv_blocks=12, **ENGINE_KW)
    parts = build_engine_parts(args, read_env({**os.environ, "VLLM_TARGET_DEVICE": "fixturehooks"}))
    assert parts.config.block_size == 16
    assert parts.platform.profile_runs == 0  # type: ignore[attr-defined]
    assert parts.config.num_kv_blocks == 11  # 12 asked for, one reserved
    assert parts.top_k_top_p is fixture_platform.greedy_sampler


def test_a_cache_too_small_after_the_reserve_is_refused(
    fixture_platform: ModuleType, model_dir: Path
) -> None:
    # 64 tokens in blocks of 8 need 8 blocks; 8 asked for, one reserved, leaves 7.
    args = EngineArgs(model=str(model_dir), num_kv_blocks=8, **ENGINE_KW)
    with pytest.raises(ConfigError) as info:
        build_engine_parts(args, read_env({**os.environ, "VLLM_TARGET_DEVICE": "fixturehooks"}))
    assert str(info.value) == (
        "the KV cache of 8 blocks, less the 1 the fixturehooks platform reserves for "
        "decode-graph padding, holds 7 blocks of 8 tokens, but one sequence of "
        "max_model_len=64 needs 8; raise the cache size (num_kv_blocks) or lower max_model_len"
    )


# --- fp8 KV cache ---------------------------------------------------------------------------


def test_an_fp8_cache_is_planned_allocated_and_written(
    fixture_platform: ModuleType, model_dir: Path
) -> None:
    engine = fixture_engine(
        model_dir, "fixtureplain", gpu_memory_utilization=0.5, kv_cache_dtype="fp8"
    )
    assert engine.config.kv_cache_dtype == torch.float8_e4m3fn
    specs = engine.platform.specs  # type: ignore[attr-defined]
    assert [(s.dtype, s.kv_cache_dtype) for s in specs] == [(torch.float32, torch.float8_e4m3fn)]
    budget = int(fixture_platform.DEVICE_BYTES * 0.5) - fixture_platform.PEAK_BYTES
    # One byte per element: four times the float32 cache's blocks.
    assert engine.config.num_kv_blocks == budget // bytes_per_block(model_dir, 8, elem=1)
    assert {c.dtype for c in engine.runner.kv_caches} == {torch.float8_e4m3fn}
    out = run_all(engine, PROMPTS[:1], GREEDY)[0]
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
    # The prompt's 5 tokens and 5 decoded ones were stored in fp8 in the first block(s).
    written = engine.runner.kv_caches[0][0].float().abs().sum(dim=(2, 3))  # [blocks, 8]
    assert int((written != 0).sum()) >= 10


def test_warm_up_leaves_calibration_to_the_first_real_request(
    fixture_platform: ModuleType, model_dir: Path
) -> None:
    """warm_up() writes dummy tokens into the real cache, then the platform forgets what
    its backends measured from them: the first real request calibrates, as without it."""

    def first_write_maxima(warm_up: bool) -> list[float]:
        engine = fixture_engine(
            model_dir, "fixtureplain", gpu_memory_utilization=0.5, kv_cache_dtype="fp8"
        )
        if warm_up:
            engine.warm_up()
        run_all(engine, PROMPTS[2:], GREEDY)
        (backend,) = engine.platform.fp8_backends  # type: ignore[attr-defined]
        return [backend.calibration[cache.data_ptr()] for cache in engine.runner.kv_caches]

    cold = first_write_maxima(warm_up=False)
    assert len(cold) == 2 and min(cold) > 0
    assert first_write_maxima(warm_up=True) == cold


def test_an_fp8_format_the_platform_lacks_is_refused(
    fixture_platform: ModuleType, model_dir: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        fixture_engine(model_dir, "fixtureplain", kv_cache_dtype="fp8_e5m2")
    assert str(info.value) == (
        "kv_cache_dtype='fp8_e5m2' is not supported on the fixtureplain platform; "
        "supported: auto, fp8, fp8_e4m3"
    )


# --- the platform sampler -------------------------------------------------------------------


def _rows(*params: SamplingParams, seeded: bool = False) -> list[SamplingRow]:
    device = torch.empty(0).device
    return [
        SamplingRow(
            params=p,
            prompt_token_ids=[0],
            output_token_ids=[],
            generator=make_generator(5, device) if seeded else None,
        )
        for p in params
    ]


def test_the_platform_sampler_takes_unseeded_top_k_top_p_rows() -> None:
    calls: list[tuple[list[list[float]], list[int], list[float]]] = []

    def kernel(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        calls.append((logits.tolist(), top_k.tolist(), top_p.tolist()))
        return torch.tensor([3, 1])

    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 2.0, 0.0, 2.0]])
    rows = _rows(
        SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=0.5, top_p=0.9)
    )
    md = build_sampling_metadata(rows, 4, logits.device)
    assert Sampler(top_k_top_p=kernel)(logits.clone(), md).token_ids == [3, 1]
    # Logits divided by each row's temperature; top_k 0 and top_p 1.0 mean "keep all".
    assert calls == [
        ([[0.5, 1.0, 1.5, 2.0], [8.0, 4.0, 0.0, 4.0]], [3, 0], [1.0, 0.8999999761581421])
    ]


def test_seeded_and_min_p_rows_keep_the_torch_sampler() -> None:
    def kernel(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the platform sampler must not see these rows")

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    for params, seeded in (
        (SamplingParams(temperature=1.0, top_k=10, seed=5), True),
        (SamplingParams(temperature=1.0, top_k=10, min_p=0.05), False),
    ):
        if seeded:
            md = build_sampling_metadata(_rows(params, params, seeded=True), 50, logits.device)
            again = build_sampling_metadata(_rows(params, params, seeded=True), 50, logits.device)
            torch_path = Sampler()(logits.clone(), again).token_ids
            assert Sampler(top_k_top_p=kernel)(logits.clone(), md).token_ids == torch_path
        else:
            md = build_sampling_metadata(_rows(params, params), 50, logits.device)
            assert len(Sampler(top_k_top_p=kernel)(logits.clone(), md).token_ids) == 2


# --- kvrun-cuda's side of the hooks (device-neutral parts, on CPU) --------------------------


def _cuda_config(
    backend: str, enforce_eager: bool, kv_cache_dtype: torch.dtype | None = None
) -> Any:
    from kvrun.config import EngineConfig

    return EngineConfig(
        model_source="m",
        model_name="m",
        architecture="LlamaForCausalLM",
        dtype=torch.float16,
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
        kv_cache_dtype=kv_cache_dtype,
        enforce_eager=enforce_eager,
    )


def test_cuda_reserves_a_block_only_when_graphs_will_be_captured() -> None:
    platform_module = pytest.importorskip("kvrun_cuda.platform")
    cuda = platform_module.CudaPlatform(read_env({}))
    assert cuda.reserved_kv_blocks(_cuda_config("TRITON_ATTN", enforce_eager=False)) == 1
    assert cuda.reserved_kv_blocks(_cuda_config("TRITON_ATTN", enforce_eager=True)) == 0
    assert cuda.reserved_kv_blocks(_cuda_config("FLASHINFER", enforce_eager=False)) == 0
    eager = _cuda_config("TRITON_ATTN", enforce_eager=True)
    assert cuda.decode_graph_runner(lambda *a: torch.empty(0), eager, pad_slot=0) is None
    # An fp8 cache read by TRITON_ATTN stays eager: its scales are measured on the host.
    fp8 = _cuda_config("TRITON_ATTN", enforce_eager=False, kv_cache_dtype=torch.float8_e4m3fn)
    assert cuda.reserved_kv_blocks(fp8) == 0
    assert cuda.decode_graph_runner(lambda *a: torch.empty(0), fp8, pad_slot=0) is None


def test_cuda_fp8_cache_selects_its_fp8_backend_with_the_env_scales() -> None:
    platform_module = pytest.importorskip("kvrun_cuda.platform")
    from kvrun.attention.base import AttentionLayerSpec

    fp8_module = pytest.importorskip("kvrun_cuda.fp8")

    cuda = platform_module.CudaPlatform(read_env({"K_SCALE_CONSTANT": "50"}))
    assert cuda.resolve_kv_cache_dtype("fp8", torch.float16) == torch.float8_e4m3fn
    with pytest.raises(ConfigError) as info:
        cuda.resolve_kv_cache_dtype("fp8_e5m2", torch.float16)
    assert str(info.value) == (
        "kv_cache_dtype='fp8_e5m2' is not supported on the cuda platform; "
        "supported: auto, fp8, fp8_e4m3"
    )
    spec = AttentionLayerSpec(
        4, 2, 64, 0.125, dtype=torch.float16, kv_cache_dtype=torch.float8_e4m3fn
    )
    # TRITON_ATTN's fp8 variant where triton is installed, else REFERENCE_FP8; either
    # measures its scales with the env's constants.
    backend = cuda.attention_backend(None, spec)
    has_triton = pytest.importorskip("kvrun_cuda.backends").module_installed("triton")
    assert backend.name == ("TRITON_ATTN" if has_triton else "REFERENCE_FP8")
    assert (backend.scales.k_scale_constant, backend.scales.v_scale_constant) == (50, 100)
    reference = cuda.attention_backend("REFERENCE_FP8", spec)
    assert isinstance(reference, fp8_module.Fp8KVCacheAttention)
    with pytest.raises(ConfigError) as info:
        cuda.attention_backend("FLASHINFER", spec)
    assert str(info.value) == (
        "VLLM_ATTENTION_BACKEND='FLASHINFER' cannot read an fp8 KV cache on the cuda "
        "platform; with kv_cache_dtype fp8 the backends are REFERENCE_FP8, TRITON_ATTN: "
        "unset VLLM_ATTENTION_BACKEND, name one of those, or use kv_cache_dtype=auto"
    )


def test_cuda_sampler_hook_adapts_flashinfer_to_the_core_contract() -> None:
    sampler_module = pytest.importorskip("kvrun_cuda.sampler")
    seen: list[tuple[list[int], torch.dtype]] = []

    def flashinfer_like(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        seen.append((k.tolist(), k.dtype))
        return torch.tensor([2, 0], dtype=torch.int32)

    adapted = sampler_module.flashinfer_top_k_top_p(flashinfer_like)
    ids = adapted(torch.zeros(2, 7), torch.tensor([0, 3]), torch.tensor([1.0, 0.5]))
    assert (ids.tolist(), ids.dtype) == ([2, 0], torch.int64)
    assert seen == [([7, 3], torch.int32)]  # top_k 0 ("keep all") becomes the vocabulary
