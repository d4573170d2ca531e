"""The native kernels: numerics against the reference ops on both builds (this CPU's ISA
and the portable C), bounds the C code relies on, and every way to not get them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvrun.models.rope import cos_sin_cache
from kvrun.ops import reference
from kvrun_cpu.native import BuildSettings, NativeKernels, load_native
from kvrun_cpu.native.build import SOURCE_DIR, default_isa, find_compiler, library_path

needs_compiler = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on PATH")
TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {}, torch.float16: {}}
# A dot product of 576..1536 terms summed in order: float32 rounding grows with k.
MATMUL_TOL = {"atol": 1e-4, "rtol": 1e-4}


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# packed matmul ------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 64, 65, 130])
@pytest.mark.parametrize(("out", "inner"), [(960, 576), (7, 33), (100, 1536), (40, 16)])
def test_packed_linear_matches_f_linear(
    native_any_isa: NativeKernels, rows: int, out: int, inner: int
) -> None:
    x, w, b = randn(rows, inner), randn(out, inner, seed=1), randn(out, seed=2)
    packed = native_any_isa.pack(w)
    assert packed.shape == (out, inner) and torch.equal(packed.unpack(), w)
    want = F.linear(x, w, b)
    torch.testing.assert_close(native_any_isa.packed_linear(x, packed, b), want, **MATMUL_TOL)
    torch.testing.assert_close(
        native_any_isa.packed_linear(x, packed), F.linear(x, w), **MATMUL_TOL
    )


def test_packed_linear_reads_strided_rows(native_kernels: NativeKernels) -> None:
    qkv = randn(5, 960)
    x = qkv[:, 64 : 64 + 576]  # rows 960 apart, as the attention output never is but could be
    w = randn(100, 576, seed=1)
    got = native_kernels.packed_linear(x, native_kernels.pack(w))
    torch.testing.assert_close(got, F.linear(x, w), **MATMUL_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_token_gets_the_same_bits_in_any_batch(
    native_any_isa: NativeKernels, dtype: torch.dtype
) -> None:
    # Every output is one fused multiply-add after another over k, whatever the tile:
    # the batch a request shares a step with cannot change its tokens.
    w = native_any_isa.pack(randn(960, 576, dtype=dtype))
    x = randn(64, 576, dtype=dtype, seed=1)
    full = native_any_isa.packed_linear(x, w)
    for rows in (1, 3, 8, 17):
        assert torch.equal(native_any_isa.packed_linear(x[:rows].contiguous(), w), full[:rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [576, 33])
def test_packed_rows_are_the_embedding_lookup(
    native_any_isa: NativeKernels, dtype: torch.dtype, hidden: int
) -> None:
    table = randn(1000, hidden, dtype=dtype)
    ids = torch.tensor([0, 999, 17, 17, 512])
    assert torch.equal(native_any_isa.packed_rows(ids, native_any_isa.pack(table)), table[ids])


def test_packed_rows_refuse_an_id_outside_the_table(native_kernels: NativeKernels) -> None:
    packed = native_kernels.pack(randn(10, 8))
    with pytest.raises(IndexError, match=r"^index 10 is out of range for 10 rows$"):
        native_kernels.packed_rows(torch.tensor([3, 10]), packed)


# elementwise --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (3, 17), (64, 576), (512, 576)])
def test_norms_and_silu(
    native_any_isa: NativeKernels, dtype: torch.dtype, tokens: int, hidden: int
) -> None:
    x, r = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=1)
    w = randn(hidden, dtype=dtype, seed=2)
    normed, summed = native_any_isa.rms_norm(x, w, 1e-5)
    assert summed is None
    torch.testing.assert_close(normed, reference.rms_norm(x, w, 1e-5), **TOL[dtype])
    normed, summed = native_any_isa.rms_norm(x, w, 1e-5, residual=r)
    want_normed, want_summed = reference.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(normed, want_normed, **TOL[dtype])
    assert summed is not None and torch.equal(summed, want_summed)
    gate_up = randn(tokens, 2 * hidden, dtype=dtype, seed=3) * 4
    torch.testing.assert_close(
        native_any_isa.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 42, 512])
def test_rotary(native_any_isa: NativeKernels, dtype: torch.dtype, tokens: int) -> None:
    qkv = randn(tokens, 15 * 64, dtype=dtype)
    q, k = qkv[:, : 9 * 64].view(tokens, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(tokens, 3, 64)
    table = cos_sin_cache(64, 10000.0, None, 2048)
    positions = torch.randint(0, 2048, (tokens,), generator=torch.Generator().manual_seed(1))
    out = native_any_isa.rotary(positions, q, k, table)
    want_q, want_k = reference.rotary_embedding(positions, q, k, table)
    torch.testing.assert_close(out[:, :9], want_q, **TOL[dtype])
    torch.testing.assert_close(out[:, 9:], want_k, **TOL[dtype])


def test_rotary_refuses_a_position_outside_the_table(native_kernels: NativeKernels) -> None:
    q, k, table = randn(2, 4, 8), randn(2, 2, 8), cos_sin_cache(8, 10000.0, None, 16)
    with pytest.raises(IndexError, match=r"^position 16 of token 1 is outside the rotary table"):
        native_kernels.rotary(torch.tensor([3, 16]), q, k, table)


def test_write_kv_writes_exactly_the_slots(native_kernels: NativeKernels) -> None:
    caches = [torch.full((3, 100, 16, 64), float("nan")) for _ in range(2)]
    key, value = randn(5, 3, 64), randn(5, 3, 64, seed=1)
    slots = torch.tensor([0, 17, 1599, 33, 800])
    native_kernels.write_kv(key, value, caches[0], caches[1], slots)
    for cache, want in zip(caches, (key, value), strict=True):
        rows = cache.view(3, 1600, 64)
        assert torch.equal(rows[:, slots].transpose(0, 1), want)
        assert int(rows.isnan().all(-1).sum()) == 3 * (1600 - 5)  # nothing else written


def test_write_kv_refuses_a_slot_outside_the_cache(native_kernels: NativeKernels) -> None:
    caches = [torch.zeros(3, 10, 16, 64) for _ in range(2)]
    with pytest.raises(IndexError, match=r"^slot 160 of token 1 is outside the KV cache"):
        native_kernels.write_kv(
            randn(2, 3, 64), randn(2, 3, 64), caches[0], caches[1], torch.tensor([5, 160])
        )
    assert not caches[0].any() and not caches[1].any()  # nothing written


# decode attention ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 48)])
def test_paged_decode_matches_the_reference(
    native_any_isa: NativeKernels, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size = 2600, 16
    lens = torch.randint(1, 600, (40,), generator=gen).tolist()
    lens[0] = 600  # enough work that both threads take a share
    free = torch.randperm(num_blocks, generator=gen).tolist()
    rows = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(len(r) for r in rows)
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    # The reference layout [NB, bs, Hk, D], handed to the kernel as a strided view.
    key_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=1)
    value_cache = randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=2)
    query = randn(len(lens), heads, head_dim, dtype=dtype, seed=3)
    out = torch.empty_like(query)
    scale = head_dim**-0.5
    native_any_isa.paged_decode(
        query,
        key_cache.permute(2, 0, 1, 3),
        value_cache.permute(2, 0, 1, 3),
        tables,
        torch.tensor(lens, dtype=torch.int32),
        scale,
        out,
    )
    want = reference.paged_attention(
        query, key_cache, value_cache, tables, lens, [1] * len(lens), scale
    )
    torch.testing.assert_close(out, want, **TOL[dtype])


# building -----------------------------------------------------------------------------
@needs_compiler
def test_built_once_then_cached(tmp_path: Path) -> None:
    first, why = load_native(tmp_path, threads=1)
    assert first is not None and why.startswith(f"built {tmp_path}/kvrun_cpu_native_")
    (lib,) = tmp_path.glob("*.so")
    assert why == f"built {lib}"
    again, why = load_native(tmp_path, threads=1)
    assert again is not None and why == f"cached {lib}"


@needs_compiler
def test_a_corrupt_cached_library_is_rebuilt(tmp_path: Path) -> None:
    # As a build killed half-way by another process would leave it (never loaded here:
    # overwriting a library this process has mapped would crash it).
    lib, _ = library_path(tmp_path, default_isa())
    lib.write_bytes(b"not a shared library")
    native, why = load_native(tmp_path, threads=1)
    assert native is not None and why == f"built {lib}"


def test_no_compiler_means_no_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no cc, gcc or clang
    native, why = load_native(tmp_path / "cache", threads=1)
    assert (native, why) == (None, "no C compiler (cc, gcc or clang) on PATH")


@needs_compiler
def test_unwritable_cache_dir_means_no_kernels(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    native, why = load_native(blocker / "cache", threads=1)
    assert native is None
    assert why.startswith(f"could not build in {blocker / 'cache'}: ")


@needs_compiler
def test_a_compile_error_names_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "cc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    native, why = load_native(tmp_path / "cache", threads=1)
    assert (native, why) == (None, f"{fake} failed: cc: error: unrecognized option")


@needs_compiler
def test_the_build_variables_steer_the_build(
    tmp_path: Path, native_kernels: NativeKernels, caplog: pytest.LogCaptureFixture
) -> None:
    # CMAKE_BUILD_TYPE=Debug, MAX_JOBS=1, VERBOSE=1: unoptimised with symbols, one
    # compiler at a time, every command logged; a library of its own, same results.
    settings = BuildSettings(build_type="Debug", jobs=1, verbose=True)
    with caplog.at_level(logging.INFO, logger="kvrun.cpu"):
        debug, why = load_native(tmp_path, threads=1, settings=settings)
    lib = Path(why.removeprefix("built "))
    assert debug is not None and lib.parent == tmp_path and lib.is_file()
    assert lib != library_path(tmp_path, default_isa())[0]
    assert b".debug_info" in lib.read_bytes()
    commands = [r.getMessage() for r in caplog.records if r.getMessage().startswith("native")]
    sources = sorted(SOURCE_DIR.glob("*.c"))
    assert len(commands) == len(sources) + 1  # each source, then the link
    assert all(" -O0 " in c and " -g " in c and " -O3 " not in c for c in commands)
    x, w = randn(3, 64), 1.0 + 0.1 * randn(64, seed=1)
    # (-O3 may contract a multiply and an add into one FMA; -O0 does not.)
    torch.testing.assert_close(
        debug.rms_norm(x, w, 1e-5)[0], native_kernels.rms_norm(x, w, 1e-5)[0], **TOL[x.dtype]
    )
    # RelWithDebInfo: -O2 -g; unset and Release: the default -O3 build.
    assert library_path(tmp_path, "generic", "RelWithDebInfo")[1][:2] == ("-O2", "-g")
    assert library_path(tmp_path, "generic", "Release") == library_path(tmp_path, "generic")
