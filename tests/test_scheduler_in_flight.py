"""Scheduler with several batches in flight (pipeline parallelism: max_concurrent_batches).

The same paged stand-in model as tests/test_scheduler.py, run the way pipelined workers
run: batches execute in submission order, each when the engine collects it, so a block
handed to another request while a batch still writes it, a request scheduled twice, or
a step's token applied to the wrong position changes the generated tokens.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence

import pytest

from kvrun.scheduling import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput
from tests.test_scheduler import PRESSURE_SPECS, PagedModel, Spec, check_output, config


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


def run_in_flight(
    cfg: SchedulerConfig,
    arrivals: Mapping[int, Sequence[Spec]],
    num_batches: int,
    abort_rng: random.Random | None = None,
) -> tuple[dict[str, Request], Scheduler, int]:
    """Drive the scheduler as the engine does with ``num_batches`` in flight: fill up to
    that many, then collect (execute, in submission order) the oldest. Returns the
    requests, the scheduler and the most batches that were in flight at once."""
    sched = Scheduler(cfg, max_concurrent_batches=num_batches)
    model = PagedModel(cfg.num_blocks, cfg.block_size)
    live: dict[str, Request] = {}
    done: dict[str, Request] = {}
    in_flight: deque[SchedulerOutput] = deque()
    peak = 0
    last_arrival = max(arrivals)
    for n in range(20_000):
        for spec in arrivals.get(n, ()):
            live[spec.request_id] = spec.make()
            sched.add_request(live[spec.request_id])
        if abort_rng is not None and live and abort_rng.random() < 0.05:
            victim = abort_rng.choice(sorted(live))
            assert sched.abort_requests([victim]) == [live[victim]]
            if live[victim].status.is_finished():  # not in flight: at once
                done[victim] = live.pop(victim)
        busy = {c.request_id for out in in_flight for c in out.chunks}
        while len(in_flight) < num_batches:
            out = sched.schedule()
            if not out.chunks:
                break
            check_output(sched, out)
            ids = {c.request_id for c in out.chunks}
            assert not ids & busy, "a request in flight was scheduled again"
            live_count = sum(1 for r in live.values() if not r.status.is_finished())
            runnable = min(live_count, cfg.max_num_seqs)
            assert len(out.chunks) <= max(1, math.ceil(runnable / num_batches))
            busy |= ids
            in_flight.append(out)
            peak = max(peak, len(in_flight))
        if in_flight:
            out = in_flight.popleft()
            for request in sched.update(out, model.execute(out)):
                if request.status.is_finished():
                    done[request.request_id] = live.pop(request.request_id)
            for rid in [rid for rid, r in live.items() if r.status.is_finished()]:
                done[rid] = live.pop(rid)  # aborted while in flight
        if n > last_arrival and not sched.has_unfinished_requests() and not in_flight:
            break
    assert not live and not in_flight
    return done, sched, peak


@pytest.mark.parametrize("num_batches", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_random_runs_in_flight_match_the_reference(seed: int, num_batches: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    max_model_len = 24
    chunked = rng.random() < 0.7
    max_num_seqs = rng.randint(2, 6)
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=rng.randint(max_num_seqs, 12) if chunked else max_model_len,
        max_model_len=max_model_len,
        block_size=block_size,
        num_blocks=rng.randint(max_model_len // block_size, 2 * max_model_len // block_size),
        enable_prefix_caching=rng.random() < 0.8,
        enable_chunked_prefill=chunked,
    )
    bases = [tuple(rng.randrange(1000) for _ in range(rng.randint(0, 12))) for _ in range(3)]
    arrivals: dict[int, list[Spec]] = {}
    for i in range(30):
        suffix = tuple(rng.randrange(1000) for _ in range(rng.randint(1, 8)))
        spec = Spec(
            f"q{i}",
            (rng.choice(bases) + suffix)[:max_model_len],
            max_tokens=rng.randint(1, 12),
            min_tokens=rng.randint(0, 1),
            eos=frozenset(range(50)),
        )
        arrivals.setdefault(rng.randint(0, 25), []).append(spec)
    done, sched, peak = run_in_flight(
        cfg, arrivals, num_batches, abort_rng=random.Random(seed + 100)
    )
    assert peak >= 2  # batches really were in flight together
    specs = [spec for specs in arrivals.values() for spec in specs]
    assert sorted(done) == sorted(spec.request_id for spec in specs)
    for spec in specs:
        request = done[spec.request_id]
        expected, status = spec.reference(max_model_len)
        if request.status is RequestStatus.FINISHED_ABORTED:
            assert request.output_token_ids == expected[: request.num_output_tokens]
        else:
            assert (request.output_token_ids, request.status) == (expected, status)
    assert sched.stats.num_free_blocks == cfg.num_blocks


def test_preemption_in_flight_keeps_outputs_identical() -> None:
    arrivals = {0: PRESSURE_SPECS[:4], 3: PRESSURE_SPECS[4:]}
    common = dict(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=32, block_size=4)
    tight, tight_sched, _ = run_in_flight(SchedulerConfig(num_blocks=8, **common), arrivals, 2)  # type: ignore[arg-type]
    assert tight_sched.stats.num_preemptions_total > 0
    for spec in PRESSURE_SPECS:
        expected, status = spec.reference(32)
        request = tight[spec.request_id]
        assert (request.output_token_ids, request.status) == (expected, status)
