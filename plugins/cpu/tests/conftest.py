"""Fixtures shared by the CPU plugin's tests."""

from __future__ import annotations

import pytest

from kvrun_cpu.native import NativeKernels, load_native
from kvrun_cpu.native.build import supported_isas


def _load(factory: pytest.TempPathFactory, isa: str | None) -> NativeKernels:
    native, why = load_native(factory.mktemp("native"), threads=2, isa=isa)
    if native is None and why.startswith("no C compiler"):
        pytest.skip(why)  # the torch paths are still tested; this machine cannot build C
    assert native is not None, why
    return native


@pytest.fixture(scope="session")
def native_kernels(tmp_path_factory: pytest.TempPathFactory) -> NativeKernels:
    """The native kernels for this CPU, built once for the session (two threads per call)."""
    return _load(tmp_path_factory, None)


@pytest.fixture(scope="session", params=supported_isas())
def native_any_isa(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> NativeKernels:
    """The native kernels built for every ISA this CPU runs, down to none at all (the
    portable C paths), so each code path of the sources is tested here."""
    return _load(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def shared_cache_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VLLM_CACHE_ROOT for platforms whose tests do not watch the build itself: the
    native library is built there once for the whole session."""
    return str(tmp_path_factory.mktemp("cache-root"))
