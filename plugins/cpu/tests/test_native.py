"""The native decode kernel: numerics against the reference op, and every way to not get it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvrun.ops import reference
from kvrun_cpu.attention.native import (
    _SPLIT_MIN_WORK,
    _library_path,
    _split,
    load_decode_kernel,
)

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on PATH"
)


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 48)])
def test_kernel_matches_reference_on_the_reference_layout(
    tmp_path: Path, heads: int, kv_heads: int, head_dim: int
) -> None:
    kernel, why = load_decode_kernel(tmp_path, threads=2)
    assert kernel is not None, why
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size = 2600, 16
    lens = torch.randint(1, 600, (64,), generator=gen).tolist()
    lens[0] = 600
    assert sum(lens) * kv_heads >= _SPLIT_MIN_WORK  # so two threads share the work
    free = torch.randperm(num_blocks, generator=gen).tolist()
    rows = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(len(r) for r in rows)
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    # The reference layout [NB, bs, Hk, D], handed to the kernel as a strided view.
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    query = torch.randn(len(lens), heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    got = kernel(
        query,
        key_cache.permute(2, 0, 1, 3),
        value_cache.permute(2, 0, 1, 3),
        tables,
        torch.tensor(lens, dtype=torch.int32),
        lens,
        scale,
    )
    want = reference.paged_attention(
        query, key_cache, value_cache, tables, lens, [1] * len(lens), scale
    )
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_split_gives_workers_equal_context() -> None:
    assert _split([600, 10, 10, 600], num_kv_heads=3, workers=2) == [0, 6, 12]
    assert _split([5, 5], num_kv_heads=1, workers=1) == [0, 2]
    assert _split([100] * 4, num_kv_heads=2, workers=4) == [0, 2, 4, 6, 8]


@needs_compiler
def test_built_once_then_cached(tmp_path: Path) -> None:
    first, why = load_decode_kernel(tmp_path, threads=1)
    assert first is not None and why.startswith(f"built {tmp_path}/kvrun_cpu_decode_")
    (lib,) = tmp_path.glob("*.so")
    assert why == f"built {lib}"
    again, why = load_decode_kernel(tmp_path, threads=1)
    assert again is not None and why == f"cached {lib}"


@needs_compiler
def test_a_corrupt_cached_library_is_rebuilt(tmp_path: Path) -> None:
    # As a build killed half-way by another process would leave it (never loaded here:
    # overwriting a library this process has mapped would crash it).
    lib, _ = _library_path(tmp_path)
    lib.write_bytes(b"not a shared library")
    kernel, why = load_decode_kernel(tmp_path, threads=1)
    assert kernel is not None and why == f"built {lib}"


def test_no_compiler_means_no_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no cc, gcc or clang
    kernel, why = load_decode_kernel(tmp_path / "cache", threads=1)
    assert (kernel, why) == (None, "no C compiler (cc, gcc or clang) on PATH")


@needs_compiler
def test_unwritable_cache_dir_means_no_kernel(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    kernel, why = load_decode_kernel(blocker / "cache", threads=1)
    assert kernel is None
    assert why.startswith(f"could not build in {blocker / 'cache'}: ")
