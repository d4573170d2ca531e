"""Every Triton kernel compiles ahead of time for sm_90 (CUDA) and gfx942 (ROCm), no GPU needed.

The installed triton wheel carries both backends, NVIDIA's ptxas and the AMD linker
(built into libtriton), so both targets compile here; a wheel without one skips that
target with the reason. Each build must produce its target's machine code (a cubin
or an hsaco, both ELF) from assembly for the right architecture, and fit the target's
shared memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun_cuda.triton.aot import (  # noqa: E402
    AOT_FP8_CACHES,
    AOT_TARGETS,
    compile_kernel,
    fp8_kernel_builds,
    kernel_builds,
)
from kvrun_cuda.triton.launch import compile_blocker  # noqa: E402

# Shared memory per block each target offers: 227 KiB on H100 (opt-in), 64 KiB LDS on MI300.
SHARED_LIMIT = {"sm_90": 227 * 1024, "gfx942": 64 * 1024}
BACKEND = {"sm_90": "nvidia", "gfx942": "amd"}
BUILD_NAMES = [b.name for b in kernel_builds()]


@pytest.fixture(scope="module", autouse=True)
def fresh_triton_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private cache: each run really compiles, and leaves nothing in ~/.triton."""
    cache = tmp_path_factory.mktemp("triton-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(cache))
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield cache


def skip_unless_compilable(target: str) -> None:
    blocker = compile_blocker()
    if blocker is not None:
        pytest.skip(blocker)
    backend = BACKEND[target]
    if backend not in triton.backends.backends:
        pytest.skip(
            f"triton {triton.__version__} has no {backend} backend "
            f"(it has: {', '.join(sorted(triton.backends.backends))})"
        )
    if backend == "nvidia":
        try:
            triton.knobs.nvidia.ptxas.path  # noqa: B018 - raises when ptxas is missing
        except RuntimeError as exc:
            pytest.skip(f"triton {triton.__version__} cannot compile for sm_90: {exc}")


def test_the_builds_cover_every_kernel_and_batch_kind() -> None:
    assert BUILD_NAMES == [
        "rms_norm",
        "fused_add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "reshape_and_cache",
        "paged_attention[decode]",
        "paged_attention[prefill]",
        "paged_attention[decode-split]",
        "awq_dequantize",
        "merge_splits",
        "fused_moe[gate-up]",
        "fused_moe[down]",
        "moe_align[count]",
        "moe_align[offsets]",
        "moe_align[tile-experts]",
        "moe_align[scatter]",
    ]


@pytest.mark.parametrize("target", sorted(AOT_TARGETS))
@pytest.mark.parametrize("name", BUILD_NAMES)
def test_kernel_compiles_ahead_of_time(target: str, name: str) -> None:
    skip_unless_compilable(target)
    (build,) = [b for b in kernel_builds("fp16") if b.name == name]
    compiled = compile_kernel(build, AOT_TARGETS[target])
    entry = build.kernel.__name__
    assert compiled.metadata.name == entry
    assert compiled.metadata.shared <= SHARED_LIMIT[target]
    if target == "sm_90":
        ptx = compiled.asm["ptx"]
        assert ".target sm_90a" in ptx.splitlines()
        assert f".visible .entry {entry}(" in ptx
        assert compiled.asm["cubin"][:4] == b"\x7fELF"
    else:
        assert '\t.amdgcn_target "amdgpu9.42-amd-amdhsa-unknown-gfx942"' in (
            compiled.asm["amdgcn"].splitlines()
        )
        assert compiled.asm["hsaco"][:4] == b"\x7fELF"


FP8_BUILDS = [
    (target, cache, build.name)
    for target, caches in sorted(AOT_FP8_CACHES.items())
    for cache in caches
    for build in fp8_kernel_builds(cache=cache)
]


def test_gfx942_compiles_the_fnuz_cache_that_rocm_stores_there() -> None:
    assert AOT_FP8_CACHES == {"sm_90": ("fp8e4nv",), "gfx942": ("fp8e4nv", "fp8e4b8")}
    (quant,) = [b for b in fp8_kernel_builds(cache="fp8e4b8") if "reshape" in b.name]
    assert quant.name == "reshape_and_cache[fp8-fnuz]"
    assert quant.constexprs["FP8_MAX"] == 240.0  # e4m3fnuz saturates at 240, not 448
    assert quant.signature()["kc_ptr"] == "*fp8e4b8"


@pytest.mark.parametrize(("target", "cache", "name"), FP8_BUILDS)
def test_fp8_cache_kernels_compile_ahead_of_time(target: str, cache: str, name: str) -> None:
    skip_unless_compilable(target)
    (build,) = [b for b in fp8_kernel_builds("bf16", cache) if b.name == name]
    compiled = compile_kernel(build, AOT_TARGETS[target])
    assert compiled.asm["cubin" if target == "sm_90" else "hsaco"][:4] == b"\x7fELF"
    assert compiled.metadata.shared <= SHARED_LIMIT[target]
    if cache == "fp8e4b8":
        # MI300 converts its own format in hardware: pack on the write, unpack on the read.
        cvt = "v_cvt_pk_fp8_f32" if "reshape" in name else "v_cvt_pk_f32_fp8"
        assert cvt in compiled.asm["amdgcn"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_attention_compiles_for_sm_90_in_other_dtypes(dtype: str, kind: str) -> None:
    skip_unless_compilable("sm_90")
    (build,) = [b for b in kernel_builds(dtype) if b.name == f"paged_attention[{kind}]"]
    compiled = compile_kernel(build, AOT_TARGETS["sm_90"])
    assert compiled.asm["cubin"][:4] == b"\x7fELF"
    assert compiled.metadata.shared <= SHARED_LIMIT["sm_90"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fused_moe_compiles_for_sm_90_in_other_dtypes(dtype: str) -> None:
    # fp32 takes the exact ("ieee") tl.dot, not TF32: another lowering than fp16's.
    skip_unless_compilable("sm_90")
    (build,) = [b for b in kernel_builds(dtype) if b.name == "fused_moe[gate-up]"]
    assert build.constexprs["IEEE"] == (dtype == "fp32")
    compiled = compile_kernel(build, AOT_TARGETS["sm_90"])
    assert compiled.asm["cubin"][:4] == b"\x7fELF"
    assert compiled.metadata.shared <= SHARED_LIMIT["sm_90"]
