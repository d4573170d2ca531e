"""Runs of the Ray executor for tests/executor/test_ray_executor.py, each in a process of
its own inside a network namespace whose only interface is loopback (Ray otherwise
binds the machine's outward address).

``python -m tests.executor.ray_scenarios NAME JSON`` runs scenario NAME with the keyword
arguments in JSON and prints ``RESULT <json>`` as its last line; :func:`run` does that
under ``unshare -n`` for a test, :func:`run_many` several scenarios in one such process
(tests/executor/conftest.py's ``ray_runs``: :func:`local` then :func:`cluster`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.executor.scenarios import (
    ScenarioResults,
    _greedy,
    alive,
    run_scenario,
    run_scenarios,
    scenario_main,
)
from tests.support.ray_cluster import RayCluster, processes_with_environ


def ray_environ() -> dict[str, str]:
    """The environment a scenario process adds for Ray: no usage stats, and Ray's token
    authentication with a token of this run (left unset, a local cluster would write
    one to ~/.ray/auth_token)."""
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }


def run(name: str, timeout_s: float = 600, **kwargs: Any) -> Any:
    """Run scenario ``name`` in its own network namespace; its result."""
    return run_scenario(
        "tests.executor.ray_scenarios", name, timeout_s, ray_environ(), ("RAY_ADDRESS",), **kwargs
    )


def run_many(scenarios: list[tuple[str, str, dict[str, Any]]], timeout_s: float) -> ScenarioResults:
    """``(label, name, kwargs)`` scenarios in order in one process in its own network
    namespace (tests.executor.scenarios.run_scenarios); each result by its label."""
    return run_scenarios(
        "tests.executor.ray_scenarios", scenarios, timeout_s, ray_environ(), ("RAY_ADDRESS",)
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


def _ray_run(
    model: str, env: dict[str, str], tp: int = 2, kill: int | None = None
) -> dict[str, Any]:
    """Greedy decode on the ray executor; where its ranks ran; nothing left after close.
    ``kill``: then, rather than close, kill -9 that rank's actor with requests running
    (:func:`_kill_running`; its result under "kill")."""
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
    if kill is not None:
        result["kill"] = _kill_running(llm.llm_engine, kill, requests=2)
        return result
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


def _kill_running(engine: Any, victim: int, requests: int) -> dict[str, Any]:
    """kill -9 rank ``victim``'s actor after three steps of ``requests`` new requests on
    ``engine`` (TP=2, or PP=2 with batches in flight; its ray executor may have run
    others before): what the engine raises, how soon, how many batches were in flight
    at the kill; what is left; then close."""
    from kvrun import SamplingParams

    runner: Any = engine.runner
    pids = list(runner.pids)
    segment = runner.segment_name
    local_ranks = list(runner.local_ranks)
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate([[5, 6, 7, 8], [100, 200, 300], [1, 2], [9, 8, 7]][:requests]):
        engine.add_request(f"kill-r{i}", prompt, params)
    for _ in range(3):
        engine.step()
    in_flight = engine.scheduler.num_in_flight
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
        "in_flight_at_kill": in_flight,
    }


def cluster(model: str, parts: list[str] | None = None) -> dict[str, Any]:
    """A two-node cluster (``ray start`` twice, one CPU each) that kvrun joins by
    RAY_ADDRESS: TP=1 in-process as the reference, then TP=2 across the nodes by plain
    calls (rank 1's actor killed after, under "tp2" "kill"), by a compiled graph
    (refused), with VLLM_RAY_BUNDLE_INDICES=1,0 (closed), and PP=2 across the nodes
    (``parts`` picks some of these by name)."""
    import ray
    import torch

    torch.set_num_threads(1)  # one thread a rank: each node has one CPU
    uni = _llm(model)
    runs: dict[str, Any] = {
        "uni": lambda: _greedy(uni, 12),
        "tp2": lambda: _ray_run(model, {}, kill=1),
        "compiled": lambda: _refused(model, {"VLLM_USE_RAY_COMPILED_DAG": "1"}),
        "bundles": lambda: _ray_run(
            model, {"VLLM_RAY_BUNDLE_INDICES": "1,0", "VLLM_RAY_PER_WORKER_GPUS": "0.5"}
        ),
        "pp2": lambda: _pp_across_nodes(model, uni),
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


def _pp_across_nodes(model: str, uni: Any) -> dict[str, Any]:
    """PP=2 with a stage on each node (one on the ring, one by actor calls) and batches
    in flight, against TP=1 in process (the LLM ``uni``), on pipeline_scenarios' greedy
    requests."""
    from tests.executor.pipeline_scenarios import _drive, _requests

    requests = _requests(None, None)
    result = _pp_run(model, {}, requests)
    result["uni"] = _drive(uni.llm_engine, requests)
    return result


def _pp_run(
    model: str, env: dict[str, str], requests: list[Any], kill: int | None = None
) -> dict[str, Any]:
    """PP=2 on the ray executor with batches in flight on ``requests``
    (pipeline_scenarios._drive's result under "pp"), where its stages ran; then closed
    (nothing left) or, with ``kill``, that rank's actor killed with new requests
    running (:func:`_kill_running`, under "kill")."""
    from tests.executor.pipeline_scenarios import _drive

    with _environ(env):
        llm = _llm(model, pipeline_parallel_size=2, distributed_executor_backend="ray")
    engine = llm.llm_engine
    runner: Any = engine.runner
    result: dict[str, Any] = {"pp": _drive(engine, requests)}
    result.update(
        runner=type(runner).__name__,
        node_ids=runner.node_ids,
        max_concurrent_batches=runner.max_concurrent_batches,
        peak_in_flight=runner.peak_in_flight,
        compiled=runner._placed.dag is not None,
        **_node_local(runner),
    )
    if kill is not None:
        result["kill"] = _kill_running(engine, kill, requests=4)
        return result
    pids = list(runner.pids)
    runner.close()
    result["alive_after_close"] = _wait_gone(pids)
    result["segment_after_close"] = _segment_exists(result["segment"])
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


# a local cluster this process starts for several engines (kvrun then uses the connection
# it finds, and leaves the cluster up at close): kvrun's own settings for a local one
LOCAL_CLUSTER: dict[str, Any] = {
    "num_cpus": 4,
    "include_dashboard": False,
    "_node_ip_address": "127.0.0.1",
    "_system_config": {
        "prestart_worker_first_driver": False,
        "metrics_report_interval_ms": 600_000,
    },
}


def local(model: str) -> dict[str, Any]:
    """No cluster to join: kvrun starts a local one for TP=1 through one actor and stops
    it at close (no Ray process left). Then, on one local cluster this process starts
    for them: TP=2 by a compiled graph (a rank killed after, under "compiled" "kill");
    PP=2 with batches in flight by plain calls (the node-local ring and result area; a
    stage killed after, under "pp_plain" "kill") and by a compiled graph (closed), on
    tests/executor/pipeline_scenarios.py's requests. TP=1 in process is the reference
    for both ("uni", "pp_uni")."""
    import ray
    import torch

    from tests.executor.pipeline_scenarios import _drive, _requests

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    uni = _llm(model)
    out["uni"] = _greedy(uni, 12)
    probe = _drive(uni.llm_engine, _requests(None, None))
    text0 = probe["requests"]["g0"]["text"]
    out["stop_string"] = text0[len(text0) // 2 : len(text0) // 2 + 3]
    out["stop_token"] = probe["requests"]["g3"]["tokens"][5]
    requests = _requests(out["stop_string"], out["stop_token"])
    out["pp_uni"] = _drive(uni.llm_engine, requests)
    tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    marker = f"RAY_TMPDIR={tmpdir}"
    # this process's shared-memory resource tracker (started for the node-local ring;
    # it unlinks the ring should this process be killed) exits with it
    from multiprocessing import resource_tracker

    try:
        with _environ({"RAY_TMPDIR": tmpdir}):
            out["ray"] = _ray_run(model, {}, tp=1)
            tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
            left = [p for p in processes_with_environ(marker) if p != tracker]
            out["ray_processes_left"] = _wait_gone(left)
            out["ray_processes_left_commands"] = [_command(p) for p in out["ray_processes_left"]]

            ray.init(**LOCAL_CLUSTER)
            compiled = {"VLLM_USE_RAY_COMPILED_DAG": "1"}
            out["compiled"] = _ray_run(model, compiled, tp=2, kill=0)
            out["pp_plain"] = _pp_run(model, {}, requests, kill=0)  # stage 0 killed
            out["pp_compiled"] = _pp_run(model, compiled, requests)
    finally:
        ray.shutdown()  # this process's cluster (nothing when none is up)
        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        _wait_gone([p for p in processes_with_environ(marker) if p != tracker])
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    scenario_main(lambda name: globals()[name])
