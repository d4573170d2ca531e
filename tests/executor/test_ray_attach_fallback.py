"""The Ray executor falls back to actor calls when its rank on the engine's node cannot
attach to the node-local data path (tests/executor/ray_fallback_scenarios.py): the
engine runs in a mount namespace with a private TMPDIR (as under systemd's
``PrivateTmp=yes``) and joins a one-node cluster started outside it, so its actor cannot
reach the engine's Unix socket. Generation equals the in-process runner's greedy tokens,
the warning is logged once, and nothing is left: no ring in /dev/shm, no socket
directory, no actor process, the cluster (not kvrun's) stopped by the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra (pip install 'kvrun[ray]')")

from tests.executor import ray_fallback_scenarios

EXACT_TOL = 1e-5  # the same arithmetic in another process

needs_namespaces = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for loopback-only network and private mount namespaces",
)


@pytest.fixture(scope="module")
def llama(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=3)


@needs_namespaces
def test_a_rank_that_cannot_attach_falls_back_to_actor_calls(llama: Path) -> None:
    out = ray_fallback_scenarios.run(timeout_s=400, model=str(llama))
    assert out["runner"] == "RayExecutor" and out["started_cluster"] is False
    # the rank is on the engine's node, yet gets its steps by actor calls
    assert len(out["node_ids"]) == 1 and out["local_ranks"] == []
    assert out["local"] is False and out["segment"] is None
    warnings = [line for line in out["logs"] if ray_fallback_scenarios.ATTACH_WARNING in line]
    assert len(warnings) == 1, out["logs"]
    assert warnings[0].startswith("ray executor: rank(s) [0] on the engine's node could not")
    assert "FileNotFoundError" in warnings[0]  # the socket is not in the actor's /tmp
    assert "every rank gets its steps by actor calls" in warnings[0]
    assert any("steps by one actor call per rank" in line for line in out["logs"]), out["logs"]
    # the same tokens and logprobs as the in-process runner
    ray_run, uni = out["ray"], out["uni"]
    assert ray_run["tokens"] == uni["tokens"]
    for seq_r, seq_u in zip(ray_run["top2"], uni["top2"]):
        for pos_r, pos_u in zip(seq_r, seq_u):
            assert [t for t, _ in pos_r] == [t for t, _ in pos_u]
            assert max(abs(a - b) for (_, a), (_, b) in zip(pos_r, pos_u)) < EXACT_TOL
    # nothing leaked: the ring made before the attach failed, the socket's directory,
    # the actor; the cluster stayed up for the engine and stopped with the test
    assert out["segments_while_running"] == [] and out["segments_after_close"] == []
    assert out["segments_after_exit"] == []
    assert [n for n in out["private_while_running"] if n.startswith("kvrun_ray_")] == []
    assert out["alive_after_close"] == [] and out["actors_alive_after_exit"] == []
    assert out["cluster_up_after_engine"] is True and out["cluster_left"] == []
    assert out["private_here"] == []
