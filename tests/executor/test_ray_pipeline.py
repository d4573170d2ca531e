"""PP=2 on the Ray executor with two batches in flight (one per stage), on a random tiny
Llama in float32, against TP=1 in process, in a local Ray cluster inside a loopback-only
network namespace (tests/executor/ray_scenarios.py ``local``, on
tests/executor/pipeline_scenarios.py's requests; the session's one Ray scenario process,
tests/executor/conftest.py ``ray_runs``):

- by plain calls (both ranks on the engine's node: the shared-memory ring, the driver's
  logits in the result area, one slot per batch in flight) and by a Ray compiled graph:
  several concurrent prompts of different lengths, stop strings and tokens, seeded
  sampling give TP=1's tokens and text, token for token;
- two batches really were in flight at once (the executor's peak count);
- every actor is gone and the ring's segment unlinked after close (the compiled
  graph's engine); a kill -9'd stage-0 actor on the ring with a batch in flight (the
  plain engine, after its requests) makes the engine dead (later calls too), kills the
  other actor and leaves no segment in /dev/shm.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

pytest.importorskip("ray", reason="the ray extra (pip install 'kvrun[ray]')")

from tests.executor.scenarios import ScenarioResults

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)


@pytest.fixture(scope="module")
def runs(ray_runs: ScenarioResults) -> dict[str, Any]:
    result: dict[str, Any] = ray_runs["local"]
    return result


def _same_outputs(got: dict[str, Any], want: dict[str, Any]) -> None:
    for request_id, expected in want["requests"].items():
        actual = got["requests"][request_id]
        assert actual["tokens"] == expected["tokens"], request_id
        assert actual["text"] == expected["text"], request_id
        assert (actual["finish"], actual["stop"]) == (expected["finish"], expected["stop"])
        assert actual["finished"]
    assert got["free_blocks"][0] == got["free_blocks"][1]  # every block back
    assert not got["unfinished"]


@pytest.mark.parametrize("path", ["plain", "compiled"])
def test_pp2_on_ray_with_batches_in_flight_equals_tp1(runs: dict[str, Any], path: str) -> None:
    got, uni = runs[f"pp_{path}"], runs["pp_uni"]
    assert got["runner"] == "RayExecutor"
    assert got["compiled"] == (path == "compiled")
    assert got["max_concurrent_batches"] == 2
    _same_outputs(got["pp"], uni)
    assert len({len(r["tokens"]) for r in uni["requests"].values()}) > 3
    assert uni["requests"]["stop-str"]["stop"] == runs["stop_string"]
    assert uni["requests"]["stop-tok"]["stop"] == runs["stop_token"]
    # two batches were submitted to the actors and not yet collected at once
    assert got["peak_in_flight"] == 2
    assert got["pp"]["max_in_flight"] >= 1
    assert got["result_area"]  # the driver's logits came through the area's slots
    if path == "plain":
        assert got["local_ranks"] == [0, 1]  # both stages took the ring
        assert got["segment_while_running"]


def test_pp2_on_ray_leaves_nothing_after_close(runs: dict[str, Any]) -> None:
    got = runs["pp_compiled"]
    assert got["alive_after_close"] == []
    assert not got["segment_after_close"]


def test_a_killed_stage_with_batches_in_flight_makes_the_engine_dead(
    runs: dict[str, Any],
) -> None:
    kill = runs["pp_plain"]["kill"]
    assert kill["in_flight_at_kill"] >= 1  # the kill came with a batch in flight
    assert kill["local_ranks"] == [0, 1]
    pid = kill["pids"][0]
    assert kill["error"] is not None
    assert kill["error"].startswith(
        f"ExecutorDeadError: the engine is dead: worker rank 0 (actor pid {pid}) died during "
        "execute"
    ), kill["error"]
    assert kill["seconds"] < 60
    assert kill["later"] == kill["error"]
    assert kill["alive"] == []  # the other stage's actor was killed too
    assert kill["segment"] is not None and kill["segment_after_death"] is False
