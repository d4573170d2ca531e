"""Shared pytest configuration. Shared fixtures live in tests/support/ modules."""

import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.support.checkpoints", "tests.support.s3"]


@pytest.fixture(autouse=True, scope="session")
def _usage_records_in_a_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Engines started by tests write their usage record under a temp dir, not ~/.config."""
    old = os.environ.get("VLLM_CONFIG_ROOT")
    os.environ["VLLM_CONFIG_ROOT"] = str(tmp_path_factory.mktemp("kvrun-config"))
    yield
    if old is None:
        os.environ.pop("VLLM_CONFIG_ROOT", None)
    else:
        os.environ["VLLM_CONFIG_ROOT"] = old
