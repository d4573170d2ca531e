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
    runner: Any = llm.llm_engine.runner
    frames_before = _node_local(runner)["ring_frames"]
    steps = _count_steps(runner)
    result = _greedy(llm, 12)
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
        **_node_local(runner),
        steps=steps[0],
        frames_before=frames_before,
    )
    runner.close()
    result["alive_after_close"] = _wait_gone(result["pids"])
    result["segment_after_close"] = _segment_exists(result["segment"])
    return result


def _count_steps(runner: Any) -> list[int]:
    """Counts the runner's execute() calls from now on (in the returned list's item)."""
    count = [0]
    execute = runner.execute

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return execute(*args, **kwargs)

    runner.execute = counted
    return count


def _command(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:300]
    except OSError:
        return "(gone)"


def _segment_exists(name: str | None) -> bool:
    return name is not None and os.path.exists(f"/dev/shm/{name}")


def _node_local(runner: Any) -> dict[str, Any]:
    """What the node-local data path holds now: its ranks, its ring's segment (and
    whether it is in /dev/shm), the frames published on the ring so far, whether the
    driver's logits have a result area."""
    local = runner._placed.local
    writer = local.writer if local is not None else None
    return {
        "local_ranks": list(runner.local_ranks),
        "segment": runner.segment_name,
        "segment_while_running": _segment_exists(runner.segment_name),
        "ring_frames": writer._counters[0].value if writer is not None else 0,
        "result_area": local is not None and local.area is not None,
    }


def _kill(model: str, env: dict[str, str], victim: int, pp: int = 1) -> dict[str, Any]:
    """kill -9 one actor's process while requests run (TP=2, or PP=``pp`` when over 1,
    with batches in flight): what the engine raises, how soon."""
    from kvrun import SamplingParams

    sizes = {"pipeline_parallel_size": pp} if pp > 1 else {"tensor_parallel_size": 2}
    with _environ(env):
        llm = _llm(model, distributed_executor_backend="ray", **sizes)
    engine = llm.llm_engine
    runner: Any = engine.runner
    pids = list(runner.pids)
    segment = runner.segment_name
    local_ranks = list(runner.local_ranks)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate([[5, 6, 7, 8], [100, 200, 300], [1, 2], [9, 8, 7]][: 2 * pp]):
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
    peak = getattr(runner, "peak_in_flight", 1)
    later = None
    try:
        runner.execute([])
    except Exception as exc:
        later = f"{type(exc).__name__}: {exc}"
    left = _wait_gone(pids)
    segment_after_death = _segment_exists(segment)  # before close(): death released it
    runner.close()
    return {
        "pids": pids,
        "error": error,
        "seconds": elapsed,
        "later": later,
        "alive": left,
        "local_ranks": local_ranks,
        "segment": segment,
        "segment_after_death": segment_after_death,
        "peak_in_flight": peak,
    }


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
        "pp2": lambda: _pp_across_nodes(model),
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


def _pp_across_nodes(model: str) -> dict[str, Any]:
    """PP=2 with a stage on each node (one on the ring, one by actor calls) and batches
    in flight, against TP=1 in process, on pipeline_scenarios' greedy requests."""
    from tests.executor.pipeline_scenarios import _drive, _requests

    requests = _requests(None, None)
    uni = _drive(_llm(model).llm_engine, requests)
    engine = _llm(model, pipeline_parallel_size=2, distributed_executor_backend="ray").llm_engine
    runner: Any = engine.runner
    got = _drive(engine, requests)
    result = {
        "uni": uni,
        "pp": got,
        "node_ids": runner.node_ids,
        "local_ranks": list(runner.local_ranks),
        "peak_in_flight": runner.peak_in_flight,
    }
    pids = list(runner.pids)
    runner.close()
    result["alive_after_close"] = _wait_gone(pids)
    return result


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
        out["kill_local"] = _kill(model, {}, victim=0)
        # this process's shared-memory resource tracker (started for the node-local
        # ring; it unlinks the ring should this process be killed) exits with it
        from multiprocessing import resource_tracker

        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        left = [p for p in processes_with_environ(f"RAY_TMPDIR={tmpdir}") if p != tracker]
        out["ray_processes_left"] = _wait_gone(left)
        out["ray_processes_left_commands"] = [_command(p) for p in out["ray_processes_left"]]
    shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def pp_in_flight(model: str) -> dict[str, Any]:
    """No cluster to join (a local one): PP=2 on the ray executor with batches in
    flight, by plain calls (the node-local ring and result area) and by a compiled
    graph, against TP=1 in process, on tests/executor/pipeline_scenarios.py's requests."""
    import torch

    from tests.executor.pipeline_scenarios import _drive, _requests

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    uni = _llm(model).llm_engine
    probe = _drive(uni, _requests(None, None))
    text0 = probe["requests"]["g0"]["text"]
    out["stop_string"] = text0[len(text0) // 2 : len(text0) // 2 + 3]
    out["stop_token"] = probe["requests"]["g3"]["tokens"][5]
    requests = _requests(out["stop_string"], out["stop_token"])
    out["uni"] = _drive(uni, requests)
    with _environ({"RAY_TMPDIR": tmpdir}):
        for name, env in (("plain", {}), ("compiled", {"VLLM_USE_RAY_COMPILED_DAG": "1"})):
            with _environ(env):
                engine = _llm(
                    model, pipeline_parallel_size=2, distributed_executor_backend="ray"
                ).llm_engine
            runner: Any = engine.runner
            got = _drive(engine, requests)
            got.update(
                runner=type(runner).__name__,
                max_concurrent_batches=runner.max_concurrent_batches,
                peak_in_flight=runner.peak_in_flight,
                compiled=runner._placed.dag is not None,
                **_node_local(runner),
            )
            pids = list(runner.pids)
            runner.close()
            got["alive_after_close"] = _wait_gone(pids)
            got["segment_after_close"] = _segment_exists(got["segment"])
            out[name] = got
        out["kill"] = _kill(model, {}, victim=0, pp=2)  # stage 0, batches in flight
    shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def main() -> None:
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    result = globals()[name](**kwargs)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
