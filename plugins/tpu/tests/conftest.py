"""Where torch_xla is installed: point XLA's persistent compile cache at a temporary
VLLM_XLA_CACHE_PATH through the platform, before any test computes on the device (XLA
fixes the cache at the first computation of the process)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvrun.envs import read_env

__all__ = ["xla_cache_dir"]


@pytest.fixture(scope="session", autouse=True)
def xla_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The session's VLLM_XLA_CACHE_PATH; None where torch_xla is missing."""
    if importlib.util.find_spec("torch_xla") is None:
        return None
    from kvrun_tpu.platform import TpuPlatform

    path = tmp_path_factory.mktemp("xla") / "xla-cache"
    TpuPlatform(read_env({"VLLM_XLA_CACHE_PATH": str(path)})).setup_process()
    return path
