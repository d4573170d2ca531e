"""The rank tests' jobs (test_ranks.py, test_ranks_families.py), run once per session in
one network namespace: one start of the rank runner for both files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.rank_jobs import run_jobs


@pytest.fixture(scope="session")
def rank_runs(
    random_checkpoint: Callable[..., Path],
    classifier_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every job of both rank test files: name -> the driver's output or the ranks'
    error records (tests/distributed/rank_jobs.py)."""
    from tests.distributed import test_ranks, test_ranks_families

    tmp = tmp_path_factory.mktemp("ranks")
    jobs = test_ranks.rank_jobs(random_checkpoint, classifier_dir, tmp)
    jobs += test_ranks_families.rank_jobs(random_checkpoint, tmp)
    return run_jobs(jobs, tmp)
