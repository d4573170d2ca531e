"""Fixtures shared by the CPU plugin's tests."""

from __future__ import annotations

import pytest

from kvrun_cpu.attention.native import DecodeKernel, load_decode_kernel


@pytest.fixture(scope="session")
def decode_kernel(tmp_path_factory: pytest.TempPathFactory) -> DecodeKernel:
    """The native decode kernel, built once for the session (two threads per call)."""
    kernel, why = load_decode_kernel(tmp_path_factory.mktemp("kernel"), threads=2)
    if kernel is None and why.startswith("no C compiler"):
        pytest.skip(why)  # the torch paths are still tested; this machine cannot build C
    assert kernel is not None, why
    return kernel
