"""kvrun-openvino: identity, the probe's answer on this machine, and the KV budget."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from kvrun.envs import read_env
from kvrun.platforms import KVCacheRequest, Unavailable
from kvrun_openvino import probe
from kvrun_openvino.platform import OpenvinoPlatform

GiB = 1 << 30
REQUEST = KVCacheRequest(
    num_layers=1,
    num_kv_heads=1,
    head_dim=8,
    block_size=16,
    dtype=torch.float32,
    max_model_len=16,
    layer_shape=lambda n: (2, n, 16, 1, 8),
)


def test_identity() -> None:
    assert (OpenvinoPlatform.name, OpenvinoPlatform.dist_backend) == ("openvino", "gloo")
    # below cpu (0): chosen only by VLLM_TARGET_DEVICE=openvino on a host with both
    assert OpenvinoPlatform.priority == -1


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None, reason="openvino present")
def test_probe_without_openvino() -> None:
    assert probe() == Unavailable('openvino is not installed: pip install "kvrun[openvino]"')


def test_probe_reports_a_missing_openvino_even_where_it_is_installed() -> None:
    # A None entry in sys.modules makes `import openvino` fail as a missing module would.
    code = (
        "import sys; sys.modules['openvino'] = None; "
        "from kvrun_openvino import probe; print(probe().reason)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (
        0,
        'openvino is not installed: pip install "kvrun[openvino]"\n',
    ), proc.stderr


def test_budget_from_kvcache_space() -> None:
    default = OpenvinoPlatform(read_env({}))
    assert default.kv_cache_budget(REQUEST) == (
        4 * GiB,
        "VLLM_OPENVINO_KVCACHE_SPACE unset or 0: the default 4 GiB",
    )
    eight = OpenvinoPlatform(read_env({"VLLM_OPENVINO_KVCACHE_SPACE": "8"}))
    assert eight.kv_cache_budget(REQUEST) == (8 * GiB, "VLLM_OPENVINO_KVCACHE_SPACE=8 GiB")
