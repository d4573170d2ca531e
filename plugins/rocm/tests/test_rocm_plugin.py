"""kvrun-rocm: identity, the probe's answer on this machine, and the budget arithmetic."""

from __future__ import annotations

import pytest
import torch

from kvrun.platforms import Unavailable
from kvrun.platforms.memory import device_memory_budget
from kvrun_rocm import probe
from kvrun_rocm.platform import RocmPlatform

GiB = 1 << 30


def test_identity() -> None:
    assert (RocmPlatform.name, RocmPlatform.device_type, RocmPlatform.dist_backend) == (
        "rocm",
        "cuda",
        "nccl",
    )
    assert RocmPlatform.priority == 90


@pytest.mark.skipif(torch.version.hip is not None, reason="torch here is a ROCm build")
def test_probe_on_a_non_rocm_torch() -> None:
    assert probe() == Unavailable(
        f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None)"
    )


def test_budget() -> None:
    budget, reason = device_memory_budget(190 * GiB, 192 * GiB, 16 * GiB, "rocm:0")
    assert budget == int(192 * GiB * 0.9) - 16 * GiB
    assert reason == "0.9 of 192.00 GiB on rocm:0 minus 16.00 GiB of weights"
