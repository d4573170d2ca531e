"""PP=2 on the mp executor with two batches in flight (one per stage), on a random tiny
Llama in float32, against TP=1 in process; every run in a process of its own inside a
loopback-only network namespace (tests/executor/pipeline_scenarios.py).

- several concurrent prompts of different lengths, max_tokens, a stop string, a stop
  token, seeded sampling: streamed tokens and text equal TP=1's, token for token;
- two batches really were in flight at once (the executor's peak count);
- a second wave of the same prompts hits the prefix cache, same tokens;
- a cache of 12 blocks preempts requests (recompute), same tokens;
- an abort of a request with a batch in flight: it stops there, the others go on equal
  to TP=1, and every KV block is free at the end;
- one request alone runs one batch at a time (nothing to overlap).

One scenario process runs all of it (two PP=2 executors: the roomy cache's, then the
small cache's, whose first request runs alone).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.executor.scenarios import run_scenario

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)

MODULE = "tests.executor.pipeline_scenarios"


@pytest.fixture(scope="module")
def llama(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=3)


@pytest.fixture(scope="module")
def runs(llama: Path) -> dict[str, Any]:
    result: dict[str, Any] = run_scenario(MODULE, "in_flight", 600, model=str(llama))
    return result


def _same_outputs(got: dict[str, Any], want: dict[str, Any], prefix: str = "") -> None:
    for request_id, expected in want["requests"].items():
        actual = got["requests"][prefix + request_id]
        assert actual["tokens"] == expected["tokens"], request_id
        assert actual["text"] == expected["text"], request_id
        assert (actual["finish"], actual["stop"]) == (expected["finish"], expected["stop"])
        assert actual["finished"]
    assert got["free_blocks"][0] == got["free_blocks"][1]  # every block back
    assert not got["unfinished"]


def test_pp2_in_flight_equals_tp1_token_for_token(runs: dict[str, Any]) -> None:
    assert runs["runner"] == "MultiprocExecutor"
    assert runs["max_concurrent_batches"] == 2
    uni, pp = runs["uni"], runs["pp"]
    _same_outputs(pp, uni)
    lengths = {len(r["tokens"]) for r in uni["requests"].values()}
    assert len(lengths) > 3  # the requests did end at different lengths
    # the stop conditions did act (and the same way on both)
    assert uni["requests"]["stop-str"]["finish"] == "stop"
    assert uni["requests"]["stop-str"]["stop"] == runs["stop_string"]
    assert uni["requests"]["stop-tok"]["stop"] == runs["stop_token"]
    assert uni["requests"]["g0"]["finish"] == "length"


def test_two_batches_were_in_flight_at_once(runs: dict[str, Any]) -> None:
    assert runs["peak_in_flight"] == 2  # submitted to the workers, not yet collected
    assert runs["pp"]["max_in_flight"] >= 1  # and one still ran while the engine sampled
    assert runs["uni"]["max_in_flight"] == 0  # TP=1: one step at a time, as before


def test_prefix_cache_works_with_batches_in_flight(runs: dict[str, Any]) -> None:
    wave2 = runs["pp_wave2"]
    assert wave2["prefix_hits"] > runs["pp"]["prefix_hits"]
    _same_outputs(wave2, runs["uni"], prefix="w2-")
    _same_outputs(runs["uni_wave2"], runs["uni"], prefix="w2-")


def test_preemption_with_batches_in_flight_keeps_the_outputs(runs: dict[str, Any]) -> None:
    tiny = runs["pp_tiny"]
    assert tiny["preemptions"] > 0
    assert tiny["free_blocks"] == [12, 12]
    _same_outputs(tiny, runs["uni"])


def test_an_abort_in_flight_ends_the_request_when_its_batch_returns(
    runs: dict[str, Any],
) -> None:
    aborted, uni = runs["pp_abort"], runs["uni"]
    assert aborted["aborted_at"] is not None  # it was in flight when aborted
    got = aborted["requests"]["a-g3"]
    # no token after the abort, and those before it are TP=1's
    assert got["tokens"] == aborted["aborted_at"]
    assert got["tokens"] == uni["requests"]["g3"]["tokens"][: len(got["tokens"])]
    assert len(got["tokens"]) < len(uni["requests"]["g3"]["tokens"])
    assert got["finish"] is None
    others = {k: v for k, v in uni["requests"].items() if k != "g3"}
    _same_outputs(aborted, {**uni, "requests": others}, prefix="a-")


def test_workers_are_gone_after_close(runs: dict[str, Any]) -> None:
    assert runs["alive_after_close"] == []
    assert all(runs["segments"]) and runs["segments_left"] == []


def test_one_request_alone_runs_one_batch_at_a_time(runs: dict[str, Any]) -> None:
    out = runs["one_request"]
    assert out["pp"]["requests"]["only"]["finished"]
    assert out["pp"]["requests"]["only"]["tokens"] == out["uni"]["requests"]["only"]["tokens"]
    assert out["peak_in_flight"] == 1
