"""What the rank tests share: their jobs for the rank runner (tests/distributed/ranks.py),
run together in one network namespace of their own (``unshare -n``, loopback up; one
runner start for test_ranks.py and test_ranks_families.py), and the comparisons they
make of the driver's outputs.

A job's output is the driver's ``{"tokens", "logits", "blocks", "prompt_logits"}``, or
``{"errors": [...]}`` with every failed rank's record (``{"error", "type", "rank",
"elapsed", "trace"}``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = [
    "NEEDS_NAMESPACE",
    "assert_pipeline_identical",
    "compare_tensor_parallel",
    "job",
    "ok",
    "run_jobs",
]

REPO = Path(__file__).resolve().parents[2]
NEEDS_NAMESPACE = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)
RUNNER_TIMEOUT_S = 900  # every job of both files, on a slow, loaded machine


def job(
    name: str,
    model: Path,
    tp: int,
    pp: int,
    prompts: list[list[int]],
    max_tokens: int,
    tmp: Path,
    **extra: Any,
) -> dict[str, Any]:
    """One job of the runner (its keys: tests/distributed/ranks.py), writing to ``tmp``."""
    return {"name": name, "model": str(model), "tp": tp, "pp": pp, "prompts": prompts,
            "max_tokens": max_tokens, "out": str(tmp / f"{name}.pt"), **extra}  # fmt: skip


def run_jobs(jobs: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """Run every job, in turn, in one network namespace: name -> its output."""
    names = [spec["name"] for spec in jobs]
    assert len(set(names)) == len(names), "job names must be unique"
    jobs_path, summary = tmp / "jobs.json", tmp / "summary.json"
    jobs_path.write_text(json.dumps(jobs))
    command = (
        f"ip link set lo up && exec {sys.executable} -m tests.distributed.ranks "
        f"{jobs_path} {summary}"
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUNNER_TIMEOUT_S,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if not summary.exists():
        pytest.fail(f"the ranks' runner failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    failed: dict[str, int] = json.loads(summary.read_text())
    out: dict[str, Any] = {}
    for spec in jobs:
        name, path = spec["name"], Path(spec["out"])
        errors = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{name}.pt.rank*"))]
        out[name] = {"errors": errors} if failed[name] or errors else torch.load(path)
    return out


def ok(runs: dict[str, Any], name: str) -> dict[str, Any]:
    """The driver's output of a job that must have succeeded."""
    run = runs[name]
    assert "errors" not in run, f"{name} failed: {run['errors']}"
    return run  # type: ignore[no-any-return]


def assert_pipeline_identical(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Pipeline stages do one rank's arithmetic in its order: tokens, every step's
    logits and the prompt logits equal bit for bit."""
    assert got["tokens"] == want["tokens"]
    for step, (a, b) in enumerate(zip(got["logits"], want["logits"], strict=True)):
        assert torch.equal(a, b), f"step {step}: pipeline logits differ from one rank's"
    assert torch.equal(got["prompt_logits"], want["prompt_logits"])


def compare_tensor_parallel(
    got: dict[str, Any], want: dict[str, Any], tolerance: float
) -> tuple[float, list[str]]:
    """Logits within ``tolerance`` of the oracle's while the inputs agree; tokens equal
    unless the oracle's top two were within it there (a near-tie), after which the
    inputs differ and that request is not compared further. Returns the largest
    difference and the near-ties seen."""
    near_ties = []
    largest = (got["prompt_logits"] - want["prompt_logits"]).abs().max().item()
    assert largest < tolerance, f"prompt logits differ by {largest}"
    assert len(got["logits"]) == len(want["logits"]) > 0
    for r in range(len(want["tokens"])):
        for step in range(len(want["logits"])):
            a, b = got["logits"][step][r], want["logits"][step][r]
            diff = (a - b).abs().max().item()
            largest = max(largest, diff)
            assert diff < tolerance, f"request {r} step {step}: logits differ by {diff}"
            if got["tokens"][r][step] != want["tokens"][r][step]:
                top2 = b.topk(2).values
                gap = (top2[0] - top2[1]).item()
                assert gap < tolerance, f"request {r} step {step}: tokens differ, gap {gap}"
                near_ties.append(f"request {r} step {step}: top-2 gap {gap:.2e}")
                break  # the inputs differ from here on
    return largest, near_ties
