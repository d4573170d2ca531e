"""kvrun-cuda: identity, the probe's answer on this machine, and the budget arithmetic."""

from __future__ import annotations

import pytest
import torch

from kvrun.platforms import Unavailable
from kvrun.platforms.memory import device_memory_budget
from kvrun_cuda import probe
from kvrun_cuda.platform import CudaPlatform

GiB = 1 << 30


def test_identity() -> None:
    assert (CudaPlatform.name, CudaPlatform.device_type, CudaPlatform.dist_backend) == (
        "cuda",
        "cuda",
        "nccl",
    )
    assert CudaPlatform.priority == 100
    assert CudaPlatform.supported_dtypes == (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch here is a CUDA build")
def test_probe_on_a_cpu_only_torch() -> None:
    assert probe() == Unavailable(
        f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    )


def test_budget_is_the_share_minus_weights() -> None:
    budget, reason = device_memory_budget(70 * GiB, 80 * GiB, 10 * GiB, "cuda:0")
    assert budget == int(80 * GiB * 0.9) - 10 * GiB
    assert reason == "0.9 of 80.00 GiB on cuda:0 minus 10.00 GiB of weights"


def test_budget_keeps_headroom_when_others_hold_memory() -> None:
    budget, reason = device_memory_budget(20 * GiB, 80 * GiB, 10 * GiB, "cuda:1")
    assert budget == 20 * GiB - (80 * GiB - int(80 * GiB * 0.9))
    assert reason == (
        "0.9 of 80.00 GiB on cuda:1 minus 10.00 GiB of weights, capped to 12.00 GiB because "
        "only 20.00 GiB is free (other allocations hold the rest)"
    )
    assert device_memory_budget(5 * GiB, 80 * GiB, 10 * GiB, "cuda:0")[0] == 0
