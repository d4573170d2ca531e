"""The Ray executor's fallback to actor calls, for tests/executor/test_ray_attach_fallback.py.

The condition is a real one: the engine runs in a mount namespace of its own whose
temporary directory is private (a tmpfs mounted over TMPDIR there, as systemd's
``PrivateTmp=yes`` or a container gives a service), and it joins a Ray cluster started
outside it. Its actors run in the cluster's namespace: the Unix socket the engine
listens on for the node-local data path (:mod:`kvrun.executor.ray_local`, in a
directory under TMPDIR) is not there for them, so no rank can attach, and the executor
must fall back to actor calls with one warning, unlink the ring it had created, and
still generate the same tokens.

``outer`` (run by :func:`run` in a loopback-only network namespace) starts a one-node
cluster with ``ray start`` and runs ``engine`` under ``unshare -m`` with the private
TMPDIR; ``python -m tests.executor.ray_fallback_scenarios NAME JSON`` prints
``RESULT <json>`` last, as tests/executor/scenarios.py's ``run_scenario`` reads it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.executor.ray_scenarios import _llm, _Records, _wait_gone
from tests.executor.scenarios import REPO, _greedy, _quote, run_scenario
from tests.support.ray_cluster import RayCluster

ATTACH_WARNING = "could not attach to its shared memory"


def run(timeout_s: float, **kwargs: Any) -> Any:
    """Scenario ``outer`` in its own network namespace; its result."""
    ray_environ = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's token authentication with a token of this run (as ray_scenarios.run)
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    return run_scenario(
        "tests.executor.ray_fallback_scenarios",
        "outer",
        timeout_s,
        ray_environ,
        ("RAY_ADDRESS",),
        **kwargs,
    )


def _segments_of(pid: int) -> list[str]:
    """The /dev/shm segments the executor created in process ``pid`` (its ring's name
    starts kvrun_mp_<pid>_)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"kvrun_mp_{pid}_*"))


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def outer(model: str, timeout_s: float = 300) -> dict[str, Any]:
    """A one-node cluster; the engine in a mount namespace with a private TMPDIR."""
    private = tempfile.mkdtemp(prefix="kvrun_private_tmp", dir="/tmp")
    out: dict[str, Any] = {}
    try:
        with RayCluster(nodes=1, cpus=1) as cluster:
            command = (
                f"mount -t tmpfs -o size=16m,mode=0700 kvrun_private_tmp {_quote(private)} && "
                f"exec {sys.executable} -m tests.executor.ray_fallback_scenarios engine "
                + _quote(json.dumps({"model": model}))
            )
            environ = {
                **os.environ,
                "TMPDIR": private,
                "RAY_ADDRESS": cluster.address,
                "RAY_TMPDIR": cluster.tmpdir,
            }
            try:
                done = subprocess.run(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", command],
                    cwd=REPO,
                    env=environ,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(
                    f"the engine did not finish in {timeout_s:g} s:\n{_text(exc.stderr)[-20000:]}"
                ) from None
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            assert done.returncode == 0 and lines, (
                f"the engine failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-20000:]}"
            )
            out = json.loads(lines[-1][len("RESULT ") :])
            # the engine's process is gone: nothing it created may outlive it
            out["segments_after_exit"] = _segments_of(out["engine_pid"])
            out["actors_alive_after_exit"] = _wait_gone(out["pids"])
            out["cluster_up_after_engine"] = len(cluster.pids()) > 0  # not the engine's to stop
        out["cluster_left"] = cluster.stop()
        # the tmpfs lived in the engine's mount namespace only: here the directory is empty
        out["private_here"] = sorted(os.listdir(private))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return out


def engine(model: str) -> dict[str, Any]:
    """In the private mount namespace: TP=1 in process (the reference), then on the Ray
    executor, which cannot attach its rank to the node-local path."""
    import torch

    torch.set_num_threads(1)  # the node has one CPU, for the actor
    private = os.environ["TMPDIR"]
    out: dict[str, Any] = {"engine_pid": os.getpid()}
    out["uni"] = _greedy(_llm(model), 12)
    records = _Records()
    logging.getLogger("kvrun").addHandler(records)
    try:
        llm = _llm(model, tensor_parallel_size=1, distributed_executor_backend="ray")
        runner: Any = llm.llm_engine.runner
        out.update(
            runner=type(runner).__name__,
            started_cluster=runner.started_cluster,
            node_ids=runner.node_ids,
            local_ranks=list(runner.local_ranks),
            segment=runner.segment_name,
            local=runner._placed.local is not None,
            pids=list(runner.pids),
            # the ring the executor created before the attach failed: unlinked already
            segments_while_running=_segments_of(os.getpid()),
            # the socket's directory under the private TMPDIR: removed already
            private_while_running=sorted(os.listdir(private)),
        )
        out["ray"] = _greedy(llm, 12)
        runner.close()
    finally:
        logging.getLogger("kvrun").removeHandler(records)
    out["logs"] = records.lines
    out["alive_after_close"] = _wait_gone(out["pids"])
    out["segments_after_close"] = _segments_of(os.getpid())
    return out


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    result = globals()[name](**kwargs)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
