"""kvrun-tpu: identity, the probe's answer on this machine, and the HBM budget."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvrun.errors import PluginError
from kvrun.platforms import Unavailable
from kvrun_tpu import probe
from kvrun_tpu.platform import TpuPlatform, hbm_budget

GiB = 1 << 30


def test_identity() -> None:
    assert (TpuPlatform.name, TpuPlatform.device_type, TpuPlatform.dist_backend) == (
        "tpu",
        "xla",
        "xla",
    )
    assert TpuPlatform.priority == 80
    assert TpuPlatform.supported_dtypes == (torch.bfloat16, torch.float32)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla present")
def test_probe_without_torch_xla() -> None:
    assert probe() == Unavailable('torch_xla is not installed: pip install "kvrun[tpu]"')


def test_budget_from_bytes_and_from_kib() -> None:
    assert hbm_budget({"bytes_limit": 16 * GiB, "bytes_used": 2 * GiB}) == (
        int(16 * GiB * 0.9) - 2 * GiB,
        "0.9 of 16.00 GiB TPU HBM minus 2.00 GiB in use",
    )
    kib = 1 << 20  # KiB per GiB
    assert hbm_budget({"kb_total": 16 * kib, "kb_free": 14 * kib}) == (
        int(16 * GiB * 0.9) - 2 * GiB,
        "0.9 of 16.00 GiB TPU HBM minus 2.00 GiB in use",
    )
    with pytest.raises(PluginError) as raised:
        hbm_budget({"peak": 1})
    assert str(raised.value) == (
        "torch_xla memory info has neither bytes_limit nor kb_total: ['peak']"
    )
