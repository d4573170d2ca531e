"""kvrun-hpu: identity and the probe's answer on this machine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrun.platforms import Unavailable
from kvrun_hpu import probe
from kvrun_hpu.platform import HpuPlatform


def test_identity() -> None:
    assert (HpuPlatform.name, HpuPlatform.device_type, HpuPlatform.dist_backend) == (
        "hpu",
        "hpu",
        "hccl",
    )
    assert HpuPlatform.priority == 70
    assert HpuPlatform.supported_dtypes == (torch.bfloat16, torch.float32)


@pytest.mark.skipif(
    importlib.util.find_spec("habana_frameworks") is not None, reason="Gaudi stack present"
)
def test_probe_without_the_gaudi_stack() -> None:
    assert probe() == Unavailable(
        "habana_frameworks is not installed: the Intel Gaudi software stack comes from "
        "Intel's Gaudi installer or Docker images, not PyPI"
    )
