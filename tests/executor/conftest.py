"""Fixtures shared by the Ray executor's tests (test_ray_executor.py, test_ray_pipeline.py):
one scenario process runs every Ray scenario they read (tests/executor/ray_scenarios.py:
``local``, then ``cluster``), once a session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.executor.scenarios import ScenarioResults


@pytest.fixture(scope="session")
def ray_llama(random_checkpoint: Callable[..., Path]) -> Path:
    """The random tiny Llama (float32) the Ray scenarios run."""
    return random_checkpoint("llama", seed=3)


@pytest.fixture(scope="session")
def ray_runs(ray_llama: Path) -> ScenarioResults:
    """``ray_scenarios.local`` (kvrun's own local cluster, then one this process starts:
    compiled graph, PP=2 in flight, killed actors) under "local" and
    ``ray_scenarios.cluster`` (the two-node cluster) under "cluster"."""
    from tests.executor import ray_scenarios

    model = {"model": str(ray_llama)}
    return ray_scenarios.run_many(
        [("local", "local", model), ("cluster", "cluster", model)], timeout_s=2400
    )
