"""The scheduler tests' stand-in model and request workloads (tests/test_scheduler.py,
tests/test_scheduler_in_flight.py).

:class:`PagedModel` is a deterministic stand-in for a model that reads its context back
from a paged slot store through each chunk's block table, so a wrong table, a stale
prefix hit or an unwritten slot changes the generated tokens; :meth:`Spec.reference`
is what it generates without any cache. :func:`drive` runs a scheduler and the model
over arrivals as the engine does, one batch or several in flight;
:func:`random_workload` draws a seeded configuration and arrivals;
:func:`check_against_reference` checks a finished run.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvrun.scheduling import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = [
    "PRESSURE_SPECS",
    "PagedModel",
    "Spec",
    "check_against_reference",
    "check_invariants",
    "check_output",
    "config",
    "drive",
    "next_token",
    "random_workload",
    "step",
]


def config(**overrides: object) -> SchedulerConfig:
    values: dict[str, object] = dict(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=4, num_blocks=32
    )
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def step(sched: Scheduler, tokens: Mapping[str, int]) -> tuple[SchedulerOutput, list[Request]]:
    """One step in which every sampling chunk samples the scripted token of its request."""
    out = sched.schedule()
    sampled = {c.request_id: [tokens[c.request_id]] for c in out.chunks if c.samples}
    return out, sched.update(out, sampled)


def next_token(history: Sequence[int]) -> int:
    """The stand-in model: a pure function of the whole token history."""
    return (sum(history) * 31 + len(history)) % 1000


class PagedModel:
    """Writes each chunk's tokens into slots through its block table, then samples from
    the history read back the same way (all writes of a step land before any read, as
    the attention contract does)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]

    def execute(self, out: SchedulerOutput) -> dict[str, list[int]]:
        bs = self.block_size
        for chunk in out.chunks:
            for j, token in enumerate(chunk.token_ids):
                pos = chunk.start_position + j
                self.slots[chunk.block_ids[pos // bs]][pos % bs] = token
        sampled = {}
        for chunk in out.chunks:
            if chunk.samples:
                end = chunk.start_position + len(chunk.token_ids)
                history = [self.slots[chunk.block_ids[p // bs]][p % bs] for p in range(end)]
                assert None not in history, f"{chunk.request_id} reads an unwritten slot"
                sampled[chunk.request_id] = [next_token(history)]  # type: ignore[arg-type]
        return sampled


@dataclass(frozen=True)
class Spec:
    """A request's parameters, to build fresh Request objects for several runs."""

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    min_tokens: int = 0
    eos: frozenset[int] = frozenset()

    def make(self) -> Request:
        return Request(
            self.request_id,
            list(self.prompt),
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            eos_token_ids=self.eos,
        )

    def reference(self, max_model_len: int) -> tuple[list[int], RequestStatus]:
        """What the stand-in model generates for this request without any cache."""
        history, out = list(self.prompt), []
        while True:
            token = next_token(history)
            history.append(token)
            out.append(token)
            if len(out) >= self.min_tokens and token in self.eos:
                return out, RequestStatus.FINISHED_STOPPED
            if len(out) >= self.max_tokens or len(history) >= max_model_len:
                return out, RequestStatus.FINISHED_LENGTH


# Five requests that overflow 8 blocks of 4 tokens: preemption under pressure.
PRESSURE_SPECS = [
    Spec("r0", tuple(range(1, 6)), max_tokens=12),
    Spec("r1", tuple(range(10, 19)), max_tokens=10),
    Spec("r2", tuple(range(20, 27)), max_tokens=14),
    Spec("r3", (1, 2, 3, 4, 5, 40, 41, 42, 43, 44, 45, 46), max_tokens=8),
    Spec("r4", tuple(range(60, 66)), max_tokens=11),
]


def check_invariants(sched: Scheduler, live: Mapping[str, Request]) -> None:
    """Between steps: statuses, block ownership, reference counts and free accounting."""
    bm, cfg = sched.block_manager, sched.config
    running = [r for r in live.values() if r.status is RequestStatus.RUNNING]
    waiting = [r for r in live.values() if r.status is not RequestStatus.RUNNING]
    assert sched.num_running == len(running) <= cfg.max_num_seqs
    assert sched.num_waiting == len(waiting)
    for r in waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert (r.block_ids, r.num_computed_tokens, bm.block_table(r.request_id)) == ([], 0, [])
    owners = Counter(b for r in running for b in r.block_ids)
    for r in running:
        assert r.block_ids == bm.block_table(r.request_id)
        assert 0 < r.num_computed_tokens < r.num_tokens
        assert len(r.block_ids) * cfg.block_size >= r.num_computed_tokens
        for index, block in enumerate(r.block_ids):
            if owners[block] > 1:
                # Shared blocks are cached, fully computed, at the same place in each table.
                assert bm.is_cached(block)
                assert (index + 1) * cfg.block_size <= r.num_computed_tokens
                assert all(
                    block not in o.block_ids or o.block_ids.index(block) == index for o in running
                )
    for block in range(cfg.num_blocks):
        assert bm.ref_count(block) == owners[block]
    free = bm.free_block_ids()
    assert len(set(free)) == len(free) == bm.num_free_blocks
    assert not set(free) & set(owners)
    assert len(owners) + len(free) == cfg.num_blocks


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """A schedule() result: within the budgets, each chunk the next tokens of a running
    request with room for them in its blocks."""
    cfg = sched.config
    assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.chunks) <= cfg.max_num_seqs
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        request = sched.get_request(chunk.request_id)
        assert request is not None and request.status is RequestStatus.RUNNING
        end = chunk.start_position + len(chunk.token_ids)
        assert chunk.start_position == request.num_computed_tokens
        assert chunk.token_ids == request.all_token_ids[chunk.start_position : end]
        assert len(chunk.block_ids) * cfg.block_size >= end
        assert chunk.samples == (end == request.num_tokens)
        if not cfg.enable_chunked_prefill:
            assert chunk.samples


RANDOM_MAX_MODEL_LEN = 24


def random_workload(seed: int, max_seqs: int) -> tuple[SchedulerConfig, dict[int, list[Spec]]]:
    """A seeded configuration (block size 2 or 4, chunked prefill 70% of the time, a
    KV cache of one to two sequences of RANDOM_MAX_MODEL_LEN, up to ``max_seqs``
    running) and 30 requests arriving over 26 steps, sharing three prefixes (prefix
    hits), about one token in twenty an EOS."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    max_model_len = RANDOM_MAX_MODEL_LEN
    chunked = rng.random() < 0.7
    max_num_seqs = rng.randint(2, max_seqs)
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
            eos=frozenset(range(50)),  # about one token in twenty ends a request early
        )
        arrivals.setdefault(rng.randint(0, 25), []).append(spec)
    return cfg, arrivals


def check_against_reference(
    done: Mapping[str, Request],
    arrivals: Mapping[int, Sequence[Spec]],
    sched: Scheduler,
    max_model_len: int,
) -> None:
    """Every request finished with the reference's tokens and status (an aborted one
    with a prefix of them), and every block is free again."""
    specs = [spec for specs in arrivals.values() for spec in specs]
    assert sorted(done) == sorted(spec.request_id for spec in specs)
    for spec in specs:
        request = done[spec.request_id]
        expected, status = spec.reference(max_model_len)
        if request.status is RequestStatus.FINISHED_ABORTED:
            assert request.output_token_ids == expected[: request.num_output_tokens]
        else:
            assert (request.output_token_ids, request.status) == (expected, status)
    assert sched.stats.num_free_blocks == sched.config.num_blocks


def drive(
    cfg: SchedulerConfig,
    arrivals: Mapping[int, Sequence[Spec]],
    num_batches: int = 1,
    abort_rng: random.Random | None = None,
) -> tuple[dict[str, Request], Scheduler, int]:
    """Drive a scheduler and the paged stand-in model until every request is done, as
    the engine does with ``num_batches`` in flight: fill up to that many, then collect
    (execute, in submission order) the oldest. ``arrivals``: step -> requests added
    then; ``abort_rng`` aborts a random live request in about one step in twenty.
    With one batch, :func:`check_invariants` holds between every two steps. Returns the
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
        if num_batches == 1:
            check_invariants(sched, live)
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
    check_invariants(sched, live)
    return done, sched, peak
