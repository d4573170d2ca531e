"""kvrun-openvino: identity, the probe's answer on this machine, and the KV budget."""

from __future__ import annotations

import importlib.util

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
    # above cpu (0), below every accelerator
    assert OpenvinoPlatform.priority == 10


@pytest.mark.skipif(importlib.util.find_spec("openvino") is not None, reason="openvino present")
def test_probe_without_openvino() -> None:
    assert probe() == Unavailable('openvino is not installed: pip install "kvrun[openvino]"')


def test_budget_from_kvcache_space() -> None:
    default = OpenvinoPlatform(read_env({}))
    assert default.kv_cache_budget(REQUEST) == (
        4 * GiB,
        "VLLM_OPENVINO_KVCACHE_SPACE unset or 0: the default 4 GiB",
    )
    eight = OpenvinoPlatform(read_env({"VLLM_OPENVINO_KVCACHE_SPACE": "8"}))
    assert eight.kv_cache_budget(REQUEST) == (8 * GiB, "VLLM_OPENVINO_KVCACHE_SPACE=8 GiB")
