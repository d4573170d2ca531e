"""The Ray executor end to end, on a random tiny Llama in float32, inside loopback-only
network namespaces (tests/executor/ray_scenarios.py):

- a real two-node Ray cluster on 127.0.0.1 (two ``ray start`` processes, one CPU each,
  joined by RAY_ADDRESS): TP=2 with one rank on each node equals TP=1 on greedy except
  at near-ties, logprobs within 1e-4; a compiled graph across nodes is refused with the
  reason (Ray 2.60's shared-memory channels hung there); PP=2 with a stage on each node
  (one on the ring, one by actor calls) and two batches in flight equals TP=1 token for
  token; the ranks take the bundles
  VLLM_RAY_BUNDLE_INDICES names; VLLM_RAY_PER_WORKER_GPUS is reported as having
  no effect on cpu; a kill -9'd actor makes the engine dead within a bounded time, the
  other actor is killed, and the cluster (not kvrun's) stays up;
- with no cluster to join kvrun starts a local one and stops it at close, leaving no
  Ray process behind; TP=1 through an actor equals the in-process runner; TP=2 through
  a Ray compiled graph (VLLM_USE_RAY_COMPILED_DAG=1, Ray's shared-memory channels)
  equals TP=1 but at near-ties, and a killed actor under it makes the engine dead;
- the node-local data path (kvrun.executor.ray_local): a rank on the engine's node gets
  every step through the shared-memory ring (its /dev/shm segment there while the
  engine runs, gone after close; one frame per step) and the driver's logits through
  the result area, also under a compiled graph; across the two nodes one rank takes
  the ring and the other actor calls (a kill -9'd actor on the ring:
  test_ray_pipeline.py);
- bad VLLM_RAY_BUNDLE_INDICES are refused naming the numbers, before Ray starts.

Every Ray run here and in test_ray_pipeline.py comes from one scenario process a session
(tests/executor/conftest.py ``ray_runs``): an actor is killed on an engine that has
already generated (its clean close is another engine's), and after kvrun's own local
cluster the one-node engines share a local cluster that process starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from kvrun.errors import ConfigError

ray = pytest.importorskip("ray", reason="the ray extra (pip install 'kvrun[ray]')")

from kvrun.envs import read_env  # noqa: E402
from kvrun.executor.ray_executor import bundle_indices  # noqa: E402
from tests.executor.scenarios import ScenarioResults  # noqa: E402

needs_netns = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)

LOGPROB_TOL = 1e-4  # float32 logprobs across different reduction orders
EXACT_TOL = 1e-5  # the same arithmetic in another process


@pytest.fixture(scope="module")
def two_nodes(ray_runs: ScenarioResults) -> dict[str, Any]:
    result: dict[str, Any] = ray_runs["cluster"]
    return result


def _assert_tp_matches(tp: dict[str, Any], uni: dict[str, Any]) -> int:
    """Greedy equal but where the reference's best two were a near-tie; the count."""
    diverged = 0
    for tokens_tp, tokens_uni, seq_tp, seq_uni in zip(
        tp["tokens"], uni["tokens"], tp["top2"], uni["top2"]
    ):
        for i, (pos_tp, pos_uni) in enumerate(zip(seq_tp, seq_uni)):
            if tokens_tp[i] != tokens_uni[i]:
                (_, best), (_, second) = pos_uni
                assert best - second < LOGPROB_TOL, (i, pos_tp, pos_uni)
                diverged += 1
                break  # the sequences continue from different tokens
            (token_tp, lp_tp), (token_uni, lp_uni) = pos_tp[0], pos_uni[0]
            assert token_tp == token_uni
            assert abs(lp_tp - lp_uni) <= LOGPROB_TOL, (i, lp_tp, lp_uni)
    return diverged


@needs_netns
def test_tp2_across_two_ray_nodes_equals_one_rank(two_nodes: dict[str, Any]) -> None:
    tp2, uni = two_nodes["tp2"], two_nodes["uni"]
    assert tp2["runner"] == "RayExecutor"
    assert tp2["started_cluster"] is False  # it joined the cluster RAY_ADDRESS names
    assert len(set(tp2["node_ids"])) == 2  # one rank on each node
    # the rank on the engine's node takes the ring, the other one actor calls
    assert len(tp2["local_ranks"]) == 1, tp2["local_ranks"]
    assert tp2["segment_while_running"] is True
    assert _assert_tp_matches(tp2, uni) <= 1  # measured: 0 of 3 sequences diverge
    # closed (the bundles run; this one's actor was killed after: "kill"), every actor
    # is gone and the ring unlinked
    closed = two_nodes["bundles"]
    assert len(closed["local_ranks"]) == 1 and closed["segment_while_running"] is True
    assert closed["segment_after_close"] is False
    assert closed["alive_after_close"] == []


@pytest.fixture(scope="module")
def one_node(ray_runs: ScenarioResults) -> dict[str, Any]:
    result: dict[str, Any] = ray_runs["local"]
    return result


@needs_netns
def test_compiled_graph_gives_the_same_tokens(one_node: dict[str, Any]) -> None:
    compiled, uni = one_node["compiled"], one_node["uni"]
    assert compiled["compiled"] is True and one_node["ray"]["compiled"] is False
    # the graph carries the steps (no ring); the driver's logits come back in the area
    assert compiled["local_ranks"] == [] and compiled["segment"] is None
    assert compiled["result_area"] is True
    assert len(compiled["pids"]) == 2 and len(set(compiled["node_ids"])) == 1
    assert _assert_tp_matches(compiled, uni) <= 1  # TP=2: near-ties may differ
    # (closed: a compiled graph leaves no actor, test_ray_pipeline.py's PP=2 run; this
    # one's rank 0 was killed after: "kill")


@needs_netns
def test_compiled_graph_across_nodes_is_refused_with_the_reason(
    two_nodes: dict[str, Any],
) -> None:
    refused = two_nodes["compiled"]
    assert refused["error"].startswith(
        "WorkerStartError: the ray executor could not start: VLLM_USE_RAY_COMPILED_DAG=1 on "
        "cpu needs every rank on the engine's node, but rank(s) "
    ), refused["error"]
    assert "unset VLLM_USE_RAY_COMPILED_DAG" in refused["error"]
    assert refused["actors_alive"] == 0  # killed before the error came back


@needs_netns
def test_a_killed_actor_under_a_compiled_graph_makes_the_engine_dead(
    one_node: dict[str, Any],
) -> None:
    kill = one_node["compiled"]["kill"]
    pid = kill["pids"][0]
    assert kill["error"] is not None
    assert kill["error"].startswith(
        f"ExecutorDeadError: the engine is dead: worker rank 0 (actor pid {pid}) died during "
        "execute: ActorDiedError"
    ), kill["error"]
    assert kill["seconds"] < 60
    assert kill["later"] == kill["error"]
    assert kill["alive"] == []


@needs_netns
def test_pp2_across_two_ray_nodes_with_batches_in_flight(two_nodes: dict[str, Any]) -> None:
    """One stage on each node: one on the node-local ring, the other by actor calls
    (their references in a FIFO), two batches in flight; TP=1's tokens exactly."""
    run = two_nodes["pp2"]
    assert len(set(run["node_ids"])) == 2
    assert len(run["local_ranks"]) == 1  # the engine's node's rank; the other by calls
    assert run["peak_in_flight"] == 2
    for request_id, want in run["uni"]["requests"].items():
        assert run["pp"]["requests"][request_id]["tokens"] == want["tokens"], request_id
    assert not run["pp"]["unfinished"]
    assert run["alive_after_close"] == []


@needs_netns
def test_bundle_indices_place_the_ranks(two_nodes: dict[str, Any]) -> None:
    tp2, swapped = two_nodes["tp2"], two_nodes["bundles"]
    assert tp2["node_ids"] == tp2["bundle_nodes"]  # unset: rank r on bundle r
    # VLLM_RAY_BUNDLE_INDICES=1,0: rank 0 on bundle 1, rank 1 on bundle 0
    assert swapped["node_ids"] == [swapped["bundle_nodes"][1], swapped["bundle_nodes"][0]]
    assert swapped["tokens"] == tp2["tokens"]
    gpus = [line for line in swapped["logs"] if line.startswith("VLLM_RAY_PER_WORKER_GPUS")]
    assert len(gpus) == 1, swapped["logs"]
    assert "has no effect here: the selected platform is cpu" in gpus[0]


@needs_netns
def test_a_killed_actor_makes_the_engine_dead_and_the_cluster_stays(
    two_nodes: dict[str, Any],
) -> None:
    kill = two_nodes["tp2"]["kill"]
    pid = kill["pids"][1]
    assert kill["error"] is not None
    assert kill["error"].startswith(
        f"ExecutorDeadError: the engine is dead: worker rank 1 (actor pid {pid}) died during "
        "execute"
    ) or kill["error"].startswith(
        # rank 0's all-reduce may report the lost peer before Ray reports the death
        "ExecutorDeadError: the engine is dead: worker rank 0 "
    ), kill["error"]
    assert kill["seconds"] < 60  # bounded: Ray reports the death, no step timeout involved
    assert kill["later"] == kill["error"]  # the engine stays dead
    assert kill["alive"] == []  # the other actor was killed too
    assert two_nodes["nodes_alive_after"] == 2  # the cluster was not kvrun's to stop
    assert two_nodes["stopped_left"] == []


@needs_netns
def test_a_local_cluster_kvrun_starts_stops_with_it(one_node: dict[str, Any]) -> None:
    ray_run, uni = one_node["ray"], one_node["uni"]
    assert ray_run["started_cluster"] is True
    assert ray_run["tokens"] == uni["tokens"]
    for seq_r, seq_u in zip(ray_run["top2"], uni["top2"]):
        for pos_r, pos_u in zip(seq_r, seq_u):
            assert [t for t, _ in pos_r] == [t for t, _ in pos_u]
            assert max(abs(a - b) for (_, a), (_, b) in zip(pos_r, pos_u)) < EXACT_TOL
    assert any("starting a local one" in line for line in ray_run["logs"])
    assert ray_run["alive_after_close"] == []
    assert one_node["ray_processes_left"] == [], one_node["ray_processes_left_commands"]


def test_bad_bundle_indices_are_refused_by_number() -> None:
    assert bundle_indices([], 2) == [0, 1]
    assert bundle_indices([1, 0], 2) == [1, 0]
    with pytest.raises(
        ConfigError,
        match=r"VLLM_RAY_BUNDLE_INDICES=0,1,2 names 3 bundle\(s\) but the engine has 2 "
        r"rank\(s\).*accepted: 2 distinct indices in 0\.\.1",
    ):
        bundle_indices([0, 1, 2], 2)
    with pytest.raises(ConfigError, match=r"VLLM_RAY_BUNDLE_INDICES=0,5: 5 is past"):
        bundle_indices([0, 5], 2)
    with pytest.raises(ConfigError, match=r"VLLM_RAY_BUNDLE_INDICES=1,1 repeats 1"):
        bundle_indices([1, 1], 2)
    # the variable's own parser refuses a repeat, naming it
    with pytest.raises(ConfigError, match=r"VLLM_RAY_BUNDLE_INDICES.*1 repeated"):
        read_env({"VLLM_RAY_BUNDLE_INDICES": "1,1"})


def test_bad_bundle_indices_stop_the_engine_before_ray_starts(
    ray_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvrun import LLM

    monkeypatch.setenv("VLLM_RAY_BUNDLE_INDICES", "0,1,2")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    with pytest.raises(ConfigError, match=r"names 3 bundle\(s\) but the engine has 2"):
        LLM(str(ray_llama), dtype="float32", tensor_parallel_size=2,
            distributed_executor_backend="ray")  # fmt: skip
    assert not ray.is_initialized()


@needs_netns
def test_a_rank_on_the_engines_node_gets_its_steps_through_shared_memory(
    one_node: dict[str, Any],
) -> None:
    run = one_node["ray"]
    assert run["local_ranks"] == [0] and run["result_area"] is True
    assert run["segment"].startswith("kvrun_mp_")
    assert run["segment_while_running"] is True
    # every step went through the ring: one frame each (no actor call carried one)
    assert run["steps"] > 0
    assert run["ring_frames"] - run["frames_before"] == run["steps"]
    assert run["segment_after_close"] is False
    assert any("node-local shared-memory ring for rank(s) [0]" in line for line in run["logs"])


# A kill -9'd actor on the ring (engine dead, the other actor killed, no segment left):
# test_ray_pipeline.py's killed stage 0 (both stages on the ring, batches in flight).
