"""kvrun-cuda library finder: VLLM_*_SO_PATH, then LD_LIBRARY_PATH, then CUDA_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun_cuda.libraries import CUDART, NCCL, FoundLibrary, find_library
from kvrun_cuda.platform import CudaPlatform


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_the_explicit_path_wins(tmp_path: Path) -> None:
    explicit = touch(tmp_path / "custom" / "libnccl-2.18.so")
    touch(tmp_path / "ld" / "libnccl.so.2")
    found = find_library(NCCL, str(explicit), str(tmp_path / "ld"), None)
    assert found == FoundLibrary(explicit, "VLLM_NCCL_SO_PATH")


def test_a_missing_explicit_path_is_an_error_not_a_search(tmp_path: Path) -> None:
    touch(tmp_path / "ld" / "libnccl.so.2")
    missing = str(tmp_path / "nope.so")
    with pytest.raises(ConfigError) as err:
        find_library(NCCL, missing, str(tmp_path / "ld"), None)
    assert str(err.value) == (
        f"VLLM_NCCL_SO_PATH={missing!r} does not name an existing file; set it to the full "
        "path of NCCL (e.g. .../libnccl.so.2) or unset it to search LD_LIBRARY_PATH and "
        "CUDA_HOME"
    )


def test_ld_library_path_in_order_then_cuda_home(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    wanted = touch(second / "libnccl.so")
    touch(tmp_path / "cuda" / "lib64" / "libnccl.so.2")
    ld = f"{first}:{second}"
    assert find_library(NCCL, None, ld, str(tmp_path / "cuda")) == FoundLibrary(
        wanted, "LD_LIBRARY_PATH"
    )
    # libnccl.so.2 is preferred to libnccl.so within one directory.
    preferred = touch(second / "libnccl.so.2")
    assert find_library(NCCL, None, ld, None).path == preferred
    home = tmp_path / "cuda"
    assert find_library(NCCL, None, str(first), str(home)) == FoundLibrary(
        home / "lib64" / "libnccl.so.2", "CUDA_HOME"
    )


def test_cudart_under_cuda_home_target_layout(tmp_path: Path) -> None:
    lib = touch(tmp_path / "targets" / "x86_64-linux" / "lib" / "libcudart.so.12")
    assert find_library(CUDART, None, None, str(tmp_path)) == FoundLibrary(lib, "CUDA_HOME")


def test_not_found_lists_where_it_looked(tmp_path: Path) -> None:
    ld = f"{tmp_path / 'x'}::{tmp_path / 'y'}"  # the empty entry is skipped
    with pytest.raises(ConfigError) as err:
        find_library(NCCL, None, ld, str(tmp_path / "cuda"))
    cuda = tmp_path / "cuda"
    assert str(err.value) == (
        f"NCCL (libnccl.so.2 or libnccl.so) was not found; searched {tmp_path / 'x'}, "
        f"{tmp_path / 'y'}, {cuda / 'lib64'}, {cuda / 'lib'}, {cuda / 'targets/x86_64-linux/lib'}; "
        "set VLLM_NCCL_SO_PATH to the library file, or add its directory to LD_LIBRARY_PATH"
    )
    with pytest.raises(ConfigError) as err:
        find_library(CUDART, None, None, None)
    assert str(err.value) == (
        "the CUDA runtime (libcudart.so.13 or libcudart.so.12 or libcudart.so.11.0 or "
        "libcudart.so) was not found; searched nowhere: LD_LIBRARY_PATH and CUDA_HOME are "
        "unset; set VLLM_CUDART_SO_PATH to the library file, or add its directory to "
        "LD_LIBRARY_PATH"
    )


def test_the_platform_reads_the_variables(tmp_path: Path) -> None:
    nccl = touch(tmp_path / "ld" / "libnccl.so.2")
    cudart = touch(tmp_path / "rt.so")
    env = read_env(
        {
            "LD_LIBRARY_PATH": str(tmp_path / "ld"),
            "VLLM_CUDART_SO_PATH": str(cudart),
            "CUDA_HOME": str(tmp_path / "cuda"),
        }
    )
    platform = CudaPlatform(env)
    assert platform.nccl_library() == FoundLibrary(nccl, "LD_LIBRARY_PATH")
    assert platform.cudart_library() == FoundLibrary(cudart, "VLLM_CUDART_SO_PATH")
