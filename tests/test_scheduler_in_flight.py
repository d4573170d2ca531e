"""Scheduler with several batches in flight (pipeline parallelism: max_concurrent_batches).

The same paged stand-in model and workloads as tests/test_scheduler.py
(tests/support/scheduling.py), run the way pipelined workers run: batches execute in
submission order, each when the engine collects it, so a block handed to another
request while a batch still writes it, a request scheduled twice, or a step's token
applied to the wrong position changes the generated tokens.
"""

from __future__ import annotations

import random

import pytest

from kvrun.scheduling import Request, RequestStatus, Scheduler, SchedulerConfig
from tests.support.scheduling import (
    PRESSURE_SPECS,
    check_against_reference,
    config,
    drive,
    random_workload,
)


def test_a_request_in_flight_is_not_scheduled_again() -> None:
    sched = Scheduler(config(), max_concurrent_batches=2)
    for rid in "ABCD":
        sched.add_request(Request(rid, [1, 2, 3], max_tokens=4))
    first = sched.schedule()
    second = sched.schedule()
    # four requests, two batches: each takes ceil(4 / 2) of them, none twice
    assert [c.request_id for c in first.chunks] == ["A", "B"]
    assert [c.request_id for c in second.chunks] == ["C", "D"]
    assert sched.num_in_flight == 2
    with pytest.raises(AssertionError, match="2 outputs in flight already"):
        sched.schedule()
    with pytest.raises(AssertionError, match="not the oldest in flight"):
        sched.update(second, {"C": [9], "D": [9]})
    updated = sched.update(first, {"A": [7], "B": [8]})
    assert [(r.request_id, r.output_token_ids) for r in updated] == [("A", [7]), ("B", [8])]
    third = sched.schedule()  # A and B decode; C and D are still in flight
    assert [(c.request_id, c.token_ids) for c in third.chunks] == [("A", [7]), ("B", [8])]


def test_a_full_queue_still_fills_every_batch() -> None:
    # ten waiting, four may run: two batches of two, not one of four and one empty
    sched = Scheduler(config(max_num_seqs=4), max_concurrent_batches=2)
    for i in range(10):
        sched.add_request(Request(f"r{i}", [1, 2, 3], max_tokens=4))
    first = sched.schedule()
    second = sched.schedule()
    assert [c.request_id for c in first.chunks] == ["r0", "r1"]
    assert [c.request_id for c in second.chunks] == ["r2", "r3"]
    assert (sched.num_running, sched.num_waiting) == (4, 6)


def test_one_batch_in_flight_keeps_the_old_alternation() -> None:
    sched = Scheduler(config())
    for rid in "ABCD":
        sched.add_request(Request(rid, [1, 2, 3], max_tokens=4))
    out = sched.schedule()
    assert [c.request_id for c in out.chunks] == ["A", "B", "C", "D"]
    with pytest.raises(AssertionError, match=r"schedule\(\) called again before update\(\)"):
        sched.schedule()


def test_max_concurrent_batches_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="max_concurrent_batches=0: a positive integer"):
        Scheduler(config(), max_concurrent_batches=0)


def test_an_abort_in_flight_takes_effect_when_the_batch_returns() -> None:
    sched = Scheduler(config(), max_concurrent_batches=2)
    a, b = Request("A", [1, 2, 3, 4, 5], max_tokens=4), Request("B", [6, 7], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    second = sched.schedule()
    assert [c.request_id for c in first.chunks] == ["A"]
    assert [c.request_id for c in second.chunks] == ["B"]
    free = sched.stats.num_free_blocks
    assert sched.abort_requests(["A", "B"]) == [a, b]
    # both batches may still be writing: every block stays held, nothing is reported
    assert sched.stats.num_free_blocks == free
    assert (a.status, a.block_ids, b.status) == (
        RequestStatus.RUNNING,
        [0, 1],
        RequestStatus.RUNNING,
    )
    assert sched.get_request("A") is a and sched.has_unfinished_requests()
    assert sched.update(first, {"A": [9]}) == []
    assert (a.status, a.block_ids, a.output_token_ids) == (RequestStatus.FINISHED_ABORTED, [], [])
    assert sched.update(second, {"B": [9]}) == []
    assert b.status is RequestStatus.FINISHED_ABORTED
    assert sched.stats.num_free_blocks == config().num_blocks
    assert not sched.has_unfinished_requests()
    assert sched.schedule().newly_finished_request_ids == ["A", "B"]


def test_a_request_in_flight_is_never_the_preemption_victim() -> None:
    # 5 blocks of 4 tokens: A (newest-first victim order: C, B, A) is in flight when
    # B and C need more blocks; the victim is C, the newest request not in flight.
    cfg = config(max_num_seqs=3, max_model_len=16, num_blocks=5, enable_prefix_caching=False)
    sched = Scheduler(cfg, max_concurrent_batches=2)
    a = Request("A", [1, 2, 3, 4], max_tokens=8)
    b = Request("B", [5, 6, 7, 8], max_tokens=8)
    c = Request("C", [9, 10, 11, 12], max_tokens=8)
    for request in (a, b, c):
        sched.add_request(request)
    first = sched.schedule()  # ceil(3 / 2) = 2 requests
    second = sched.schedule()
    assert [ch.request_id for ch in first.chunks] == ["A", "B"]
    assert [ch.request_id for ch in second.chunks] == ["C"]
    sched.update(first, {"A": [1], "B": [2]})
    sched.update(second, {"C": [3]})
    third = sched.schedule()  # A and B decode into new blocks: 5 blocks in use
    assert [ch.request_id for ch in third.chunks] == ["A", "B"]
    assert sched.stats.num_free_blocks == 0
    fourth = sched.schedule()  # C needs a block too: A and B are in flight, C goes
    assert fourth.chunks == [] and fourth.preempted_request_ids == ["C"]
    assert (a.status, b.status, c.status) == (
        RequestStatus.RUNNING,
        RequestStatus.RUNNING,
        RequestStatus.PREEMPTED,
    )
    assert len(a.block_ids) == len(b.block_ids) == 2


# ---- random runs against the reference ----------------------------------------------------


@pytest.mark.parametrize("num_batches", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_random_runs_in_flight_match_the_reference(seed: int, num_batches: int) -> None:
    cfg, arrivals = random_workload(seed, max_seqs=6)
    done, sched, peak = drive(cfg, arrivals, num_batches, abort_rng=random.Random(seed + 100))
    assert peak >= 2  # batches really were in flight together
    check_against_reference(done, arrivals, sched, cfg.max_model_len)


def test_preemption_in_flight_keeps_outputs_identical() -> None:
    arrivals = {0: PRESSURE_SPECS[:4], 3: PRESSURE_SPECS[4:]}
    common = dict(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32, block_size=4)
    tight, tight_sched, _ = drive(SchedulerConfig(num_blocks=8, **common), arrivals, 2)  # type: ignore[arg-type]
    assert tight_sched.stats.num_preemptions_total > 0
    for spec in PRESSURE_SPECS:
        expected, status = spec.reference(32)
        request = tight[spec.request_id]
        assert (request.output_token_ids, request.status) == (expected, status)
