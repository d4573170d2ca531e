"""Runs of the Ray executor for tests/executor/test_ray_executor.py, each in a process of
its own inside a network namespace whose only interface is loopback (Ray otherwise
binds the machine's outward address).

``python -m tests.executor.ray_scenarios NAME JSON`` runs scenario NAME with the keyword
arguments in JSON and prints ``RESULT <json>`` as its last line; :func:`run` does that
under ``unshare -n`` for a test.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.executor.scenarios import _greedy, alive, run_scenario
from tests.support.ray_cluster import RayCluster, processes_with_environ


def run(name: str, timeout_s: float = 600, **kwargs: Any) -> Any:
    """Run scenario ``name`` in its own network namespace; its result."""
    ray_environ = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's token authentication with a token of this run (left unset, a local
        # cluster would write one to ~/.ray/auth_token)
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    return run_scenario(
        "tests.executor.ray_scenarios", name, timeout_s, ray_environ, ("RAY_ADDRESS",), **kwargs
    )


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _llm(model: str, **kwargs: Any) -> Any:
    from kvrun import LLM

    return LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128, **kwargs)


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def _ray_run(model: str, env: dict[str, str], tp: int = 2) -> dict[str, Any]:
    """Greedy decode on the ray executor; where its ranks ran; nothing left after close."""
    import ray

    records = _Records()
    logging.getLogger("kvrun").addHandler(records)
    try:
        with _environ(env):
            llm = _llm(model, tensor_parallel_size=tp, distributed_executor_backend="ray")
    finally:
        logging.getLogger("kvrun").removeHandler(records)
    result = _greedy(llm, 12)
    runner: Any = llm.llm_engine.runner
    group = runner._placed.placement_group
    table = ray.util.placement_group_table(group)
    result.update(
        runner=type(runner).__name__,
        pids=runner.pids,
        node_ids=runner.node_ids,
        bundle_nodes=[table["bundles_to_node_id"][i] for i in range(tp)],
        compiled=runner._placed.dag is not None,
        started_cluster=runner.started_cluster,
        logs=records.lines,
    )
    runner.close()
    result["alive_after_close"] = _wait_gone(result["pids"])
    return result


def _kill(model: str, env: dict[str, str], victim: int) -> dict[str, Any]:
    """kill -9 one actor's process while requests run: what the engine raises, how soon."""
    from kvrun import SamplingParams

    with _environ(env):
        llm = _llm(model, tensor_parallel_size=2, distributed_executor_backend="ray")
    engine = llm.llm_engine
    runner: Any = engine.runner
    pids = list(runner.pids)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate([[5, 6, 7, 8], [100, 200, 300]]):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(3):
        engine.step()
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    error = None
    try:
        while engine.has_unfinished_requests():
            engine.step()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - killed
    later = None
    try:
        runner.execute([])
    except Exception as exc:
        later = f"{type(exc).__name__}: {exc}"
    left = _wait_gone(pids)
    runner.close()
    return {"pids": pids, "error": error, "seconds": elapsed, "later": later, "alive": left}


def cluster(model: str, parts: list[str] | None = None) -> dict[str, Any]:
    """A two-node cluster (``ray start`` twice, one CPU each) that kvrun joins by
    RAY_ADDRESS: TP=1 in-process as the reference, then TP=2 across the nodes by plain
    calls, by a compiled graph, with VLLM_RAY_BUNDLE_INDICES=1,0, and killed actors
    (``parts`` picks some of these by name)."""
    import ray
    import torch

    torch.set_num_threads(1)  # one thread a rank: each node has one CPU
    runs: dict[str, Any] = {
        "uni": lambda: _greedy(_llm(model), 12),
        "tp2": lambda: _ray_run(model, {}),
        "compiled": lambda: _refused(model, {"VLLM_USE_RAY_COMPILED_DAG": "1"}),
        "bundles": lambda: _ray_run(
            model, {"VLLM_RAY_BUNDLE_INDICES": "1,0", "VLLM_RAY_PER_WORKER_GPUS": "0.5"}
        ),
        "kill": lambda: _kill(model, {}, victim=1),
    }
    out: dict[str, Any] = {}
    with RayCluster(nodes=2, cpus=1) as ray_cluster:
        base = {"RAY_ADDRESS": ray_cluster.address, "RAY_TMPDIR": ray_cluster.tmpdir}
        with _environ(base):
            for name, part in runs.items():
                if parts is None or name in parts:
                    out[name] = part()
            # the cluster is not ours: still up, both nodes alive
            ray.init(address=ray_cluster.address)
            out["nodes_alive_after"] = sum(1 for n in ray.nodes() if n["Alive"])
            ray.shutdown()
        out["stopped_left"] = ray_cluster.stop()
    return out


def _refused(model: str, env: dict[str, str]) -> dict[str, Any]:
    """An engine that must not start: the error, and the actors it left."""
    import ray

    error = None
    try:
        with _environ(env):
            _llm(model, tensor_parallel_size=2, distributed_executor_backend="ray")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    ray.init(address=os.environ["RAY_ADDRESS"])
    actors = [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
    ray.shutdown()
    return {"error": error, "actors_alive": len(actors)}


def local(model: str) -> dict[str, Any]:
    """No cluster to join: kvrun starts a local one and stops it at close: one actor;
    then two, by a compiled graph, and two by a compiled graph with one killed."""
    import torch

    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    with _environ({"RAY_TMPDIR": tmpdir}):
        out["uni"] = _greedy(_llm(model), 12)
        out["ray"] = _ray_run(model, {}, tp=1)
        out["compiled"] = _ray_run(model, {"VLLM_USE_RAY_COMPILED_DAG": "1"}, tp=2)
        out["kill_compiled"] = _kill(model, {"VLLM_USE_RAY_COMPILED_DAG": "1"}, victim=0)
        out["ray_processes_left"] = _wait_gone(processes_with_environ(f"RAY_TMPDIR={tmpdir}"))
    shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    result = globals()[name](**kwargs)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
