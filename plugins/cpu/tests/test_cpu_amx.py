"""The AMX build: bf16 matmuls on tiles against the exact product, batch invariance,
the tile permission Linux must grant, and the fallback where it is not there.

Skipped, with the reason, where this CPU has no AMX (AMD Zen 4); the fallback and the
ISA choice are tested everywhere."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvrun_cpu.native as native_mod
from kvrun.host_cpu import host_cpu
from kvrun_cpu.native import NativeKernels, load_native
from kvrun_cpu.native.amx import AMX_ISA, FALLBACK_ISA, describe_init, init_tiles
from kvrun_cpu.native.build import find_compiler, supported_isas

needs_compiler = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on PATH")
needs_amx = pytest.mark.skipif(
    AMX_ISA not in supported_isas(),
    reason=f"this CPU has no AMX_BF16 tiles ({host_cpu().describe()})",
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def assert_near_exact(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """got is x @ w.T + b summed in float32 and rounded to bfloat16 once: within half a
    bfloat16 step (2**-9 relative, allowed 2**-8) of the exact product, plus what
    float32 sums of these k terms may lose (2**-16 of the sum of |terms|)."""
    exact = x.double() @ w.double().T
    size = x.double().abs() @ w.double().abs().T
    if b is not None:
        exact, size = exact + b.double(), size + b.double().abs()
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    bound = exact.abs() * 2**-8 + size * 2**-16
    if not err.numel():
        return
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"output {divmod(worst, exact.shape[1])}: {float(got.flatten()[worst])} vs "
        f"{float(exact.flatten()[worst])}"
    )


@pytest.fixture(scope="module")
def amx(tmp_path_factory: pytest.TempPathFactory) -> NativeKernels:
    if AMX_ISA not in supported_isas():
        pytest.skip(f"this CPU has no AMX_BF16 tiles ({host_cpu().describe()})")
    native, why = load_native(tmp_path_factory.mktemp("amx"), threads=2, isa=AMX_ISA)
    if native is None and why.startswith("no C compiler"):
        pytest.skip(why)
    assert native is not None, why
    if native.isa != AMX_ISA:
        pytest.skip(f"AMX unusable here: {native.note}")
    return native


# rows: decode (1..16), ragged tiles, prefill; (out, inner): SmolLM2's projections, k
# not a multiple of 32 (tail chunk: 33, 1000, 31 odd), out not a multiple of 16.
@pytest.mark.parametrize("rows", [1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 100, 257, 300])
@pytest.mark.parametrize(
    ("out", "inner"), [(960, 576), (576, 1536), (7, 33), (100, 1000), (40, 31), (33, 64)]
)
def test_amx_linear_is_the_exact_product_rounded(
    amx: NativeKernels, rows: int, out: int, inner: int
) -> None:
    x, w, b = randn(rows, inner), randn(out, inner, seed=1), randn(out, seed=2)
    packed = amx.pack(w)
    assert_near_exact(amx.packed_linear(x, packed, b), x, w, b)
    assert_near_exact(amx.packed_linear(x, packed), x, w, None)


@pytest.mark.parametrize(("rows", "out", "inner"), [(1, 960, 576), (64, 1536, 576), (130, 7, 33)])
def test_amx_linear_agrees_with_the_reference_op(
    amx: NativeKernels, rows: int, out: int, inner: int
) -> None:
    from kvrun.ops import reference

    x, w = randn(rows, inner), randn(out, inner, seed=1)
    want = reference.linear(x, w, None)  # torch's bf16 matmul, float32 sums
    torch.testing.assert_close(amx.packed_linear(x, amx.pack(w)), want, atol=0.05, rtol=2**-7)


def test_amx_reads_strided_rows(amx: NativeKernels) -> None:
    qkv = randn(37, 960)
    x = qkv[:, 64 : 64 + 576]  # rows 960 apart
    w = randn(100, 576, seed=1)
    assert_near_exact(amx.packed_linear(x, amx.pack(w)), x, w, None)


@pytest.mark.parametrize("inner", [33, 1000, 31, 64])
@pytest.mark.parametrize("rows", [5, 40])
def test_amx_reads_nothing_past_a_rows_k_values(amx: NativeKernels, inner: int, rows: int) -> None:
    # NaN right after each row's k values (and after the last row): a tile that read a
    # whole 32-value chunk past k would carry NaN into the sums, even times a zero weight.
    wide = torch.full((rows + 1, inner + 40), float("nan")).bfloat16()
    wide[:rows, :inner] = randn(rows, inner)
    x = wide[:rows, :inner]
    w = randn(70, inner, seed=1)
    assert_near_exact(amx.packed_linear(x, amx.pack(w)), x, w, None)


@pytest.mark.parametrize("inner", [576, 33])
def test_amx_gives_a_token_the_same_bits_in_any_batch(amx: NativeKernels, inner: int) -> None:
    # Each output is its row against its column, chunk after chunk of k in order: the
    # other rows of its tile and the batch size change nothing, small batches included.
    w = amx.pack(randn(960, inner))
    x = randn(300, inner, seed=1)
    full = amx.packed_linear(x, w)
    for rows in (1, 3, 15, 16, 17, 33, 100):
        assert torch.equal(amx.packed_linear(x[:rows].contiguous(), w), full[:rows])
    assert torch.equal(amx.packed_linear(x[250:].contiguous(), w), full[250:])


def test_amx_grouped_linear_is_each_groups_product(amx: NativeKernels) -> None:
    weights = [randn(200, 576, seed=s) for s in range(4)]
    offsets = torch.tensor([0, 5, 5, 40, 77])  # an empty group, ragged sizes
    x = randn(77, 576, seed=9)
    got = amx.grouped_linear(x, offsets, [amx.pack(w) for w in weights])
    for g, w in enumerate(weights):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        assert_near_exact(got[lo:hi], x[lo:hi], w, None)
        assert torch.equal(got[lo:hi], amx.packed_linear(x[lo:hi], amx.pack(w)))


@needs_amx
def test_the_amx_build_is_the_widest_and_asks_for_the_tiles(amx: NativeKernels) -> None:
    assert supported_isas()[:2] == [AMX_ISA, FALLBACK_ISA]
    assert amx.note is None and f"_{AMX_ISA}_" in amx.library.name
    assert init_tiles(amx.amx_init_fn) is None  # asking again is granted again
    assert host_cpu().amx_tiles == "granted"
    assert host_cpu().describe().endswith(" (AMX tiles granted)")


@needs_compiler
def test_a_build_without_amx_says_so(tmp_path: Path) -> None:
    native, why = load_native(tmp_path, threads=1, isa=FALLBACK_ISA)
    if native is None:
        pytest.skip(f"no {FALLBACK_ISA} build here: {why}")
    assert init_tiles(native.amx_init_fn) == "the library was built without AMX"


def test_init_codes_say_what_went_wrong() -> None:
    assert describe_init(0) is None
    assert describe_init(-2) == "CPUID reports no AMX-TILE/AMX-BF16"
    assert describe_init(errno.EPERM) == (
        "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: EPERM, "
        "Operation not permitted)"
    )


@needs_amx
@needs_compiler
def test_refused_tiles_fall_back_to_avx512_bf16_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What load_native does with Linux's refusal (ENOSPC: a thread's sigaltstack too
    # small for the tile state); the refusal itself cannot be provoked here.
    monkeypatch.setattr(native_mod, "init_tiles", lambda fn: describe_init(errno.ENOSPC))
    native_mod.log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="kvrun.cpu"):
        first, why = load_native(tmp_path, threads=1)
        second, _ = load_native(tmp_path, threads=1)
    assert first is not None and second is not None
    assert first.isa == second.isa == FALLBACK_ISA
    assert first.note == f"{AMX_ISA} unused: " + describe_init(errno.ENOSPC)
    assert why.endswith(f"({first.note})")
    (record,) = caplog.records  # once per process and reason
    assert record.getMessage() == (
        f"AMX unused, bf16 matmuls on {FALLBACK_ISA}: {describe_init(errno.ENOSPC)}"
    )
    x, w = randn(40, 64), randn(48, 64, seed=1)
    assert_near_exact(first.packed_linear(x, first.pack(w)), x, w, None)


_FRESH_PROCESS = """
import sys, torch
from pathlib import Path
from kvrun_cpu.native import NativeKernels, load_native

torch.set_num_threads(2)
torch.manual_seed(0)
torch.ones(4096, 4096).sum()  # torch's OpenMP pool exists before the tiles are asked for
cache = Path(sys.argv[1])
x = torch.randn(100, 576).bfloat16()
w = torch.randn(960, 576).bfloat16()
vdp, _ = load_native(cache, 2, isa="AVX512_BF16")
want_vdp = vdp.packed_linear(x, vdp.pack(w))
# The AMX library before anyone asked for the tiles: it must not touch them.
lib = next(cache.glob("kvrun_cpu_native_AMX_BF16_*.so"))
raw = NativeKernels(lib, 2, "AMX_BF16")
assert torch.equal(raw.packed_linear(x, raw.pack(w)), want_vdp), "tiles used unasked"
amx, why = load_native(cache, 2, isa="AMX_BF16")  # asks; then both threads use tiles
assert amx.isa == "AMX_BF16", why
got = amx.packed_linear(x, amx.pack(w))
exact = (x.double() @ w.double().T)
assert float((got.double() - exact).abs().max()) < 0.5
assert not torch.equal(got, want_vdp), "the tiles round differently somewhere in 96000"
print("ok")
"""


@needs_amx
@needs_compiler
def test_tiles_only_after_asking_and_on_threads_started_before(amx: NativeKernels) -> None:
    # A fresh process: torch's OpenMP threads exist before the permission is asked for,
    # and the kernels on them run (an unpermitted tile instruction is SIGILL). Before
    # asking, the AMX library keeps to vdpbf16ps.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FRESH_PROCESS), str(amx.library.parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
