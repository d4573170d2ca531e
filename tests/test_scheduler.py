"""Scheduler: exact chunks and block tables, stops, aborts, preemption, random-run invariants.

The end-to-end tests drive the scheduler with a deterministic stand-in for a model that
reads its context back from a paged slot store through each chunk's block table, so a
wrong table, a stale prefix hit or an unwritten slot changes the generated tokens.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from kvrun.errors import ConfigError
from kvrun.scheduling import (
    Request,
    RequestStatus,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


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


def run(
    cfg: SchedulerConfig,
    arrivals: Mapping[int, Sequence[Spec]],
    abort_rng: random.Random | None = None,
) -> tuple[dict[str, Request], Scheduler]:
    """Drive a scheduler and the paged stand-in model until every request is done."""
    sched = Scheduler(cfg)
    model = PagedModel(cfg.num_blocks, cfg.block_size)
    live: dict[str, Request] = {}
    done: dict[str, Request] = {}
    last_arrival = max(arrivals)
    for n in range(10_000):
        for spec in arrivals.get(n, ()):
            live[spec.request_id] = spec.make()
            sched.add_request(live[spec.request_id])
        if abort_rng is not None and live and abort_rng.random() < 0.05:
            victim = abort_rng.choice(sorted(live))
            assert sched.abort_requests([victim]) == [live[victim]]
            done[victim] = live.pop(victim)
        check_invariants(sched, live)
        out = sched.schedule()
        check_output(sched, out)
        sampled = model.execute(out) if out.chunks else {}
        for request in sched.update(out, sampled) if out.chunks else []:
            if request.status.is_finished():
                done[request.request_id] = live.pop(request.request_id)
        if n > last_arrival and not sched.has_unfinished_requests():
            break
    assert not live
    check_invariants(sched, live)
    return done, sched


# ---- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs=0 is not accepted; it must be a positive integer"),
        ({"block_size": -4}, "block_size=-4 is not accepted; it must be a positive integer"),
        (
            {"max_num_batched_tokens": 3},
            "max_num_batched_tokens=3 is below max_num_seqs=4; it must be >= max_num_seqs",
        ),
        (
            {"max_num_batched_tokens": 32, "enable_chunked_prefill": False},
            "max_num_batched_tokens=32 is below max_model_len=64 with chunked prefill "
            "disabled; it must be >= max_model_len, or enable chunked prefill",
        ),
        (
            {"num_blocks": 15},
            "the scheduler's KV cache (num_blocks=15) holds 15 blocks of 4 tokens, but one "
            "sequence of max_model_len=64 needs 16; give the KV cache more memory or lower "
            "max_model_len",
        ),
    ],
)
def test_config_errors_name_the_value_and_what_is_accepted(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(**overrides)
    assert str(info.value) == message


# ---- chunks ---------------------------------------------------------------------------


def test_chunked_prefill_spans_steps_then_decodes() -> None:
    sched = Scheduler(config(max_num_batched_tokens=8, max_num_seqs=2))
    sched.add_request(Request("a", list(range(1, 21)), max_tokens=2))
    out, updated = step(sched, {})
    assert out.chunks == [ScheduledChunk("a", list(range(1, 9)), 0, [0, 1], False, True)]
    assert (out.num_batched_tokens, updated) == (8, [])
    out, updated = step(sched, {})
    assert out.chunks == [ScheduledChunk("a", list(range(9, 17)), 8, [0, 1, 2, 3], False, True)]
    out, updated = step(sched, {"a": 500})
    assert out.chunks == [ScheduledChunk("a", list(range(17, 21)), 16, [0, 1, 2, 3, 4], True, True)]
    request = sched.get_request("a")
    assert updated == [request] and request is not None
    assert (request.output_token_ids, request.num_computed_tokens) == ([500], 20)
    out, updated = step(sched, {"a": 600})
    assert out.chunks == [ScheduledChunk("a", [500], 20, [0, 1, 2, 3, 4, 5], True, False)]
    assert updated == [request]
    assert (request.status, request.finish_reason, request.output_token_ids) == (
        RequestStatus.FINISHED_LENGTH,
        "length",
        [500, 600],
    )
    assert (request.block_ids, sched.get_request("a"), sched.has_unfinished_requests()) == (
        [],
        None,
        False,
    )
    out = sched.schedule()
    assert (out.chunks, out.newly_finished_request_ids) == ([], ["a"])
    assert sched.stats.num_free_blocks == 32
    # 21 computed tokens filled 5 blocks, prompt and output alike; all stay cached.
    assert [sched.block_manager.is_cached(b) for b in range(6)] == [True] * 5 + [False]


def test_prefill_chunks_and_decodes_share_a_step() -> None:
    sched = Scheduler(config(max_num_batched_tokens=8, max_num_seqs=2))
    sched.add_request(Request("A", [1, 2, 3], max_tokens=5))
    out, _ = step(sched, {"A": 10})
    assert out.chunks == [ScheduledChunk("A", [1, 2, 3], 0, [0], True, True)]
    sched.add_request(Request("B", list(range(20, 30)), max_tokens=5))
    out, updated = step(sched, {"A": 11})
    assert out.chunks == [
        ScheduledChunk("A", [10], 3, [0], True, False),
        ScheduledChunk("B", list(range(20, 27)), 0, [1, 2], False, True),
    ]
    assert out.num_batched_tokens == 8
    assert [r.request_id for r in updated] == ["A"]
    out, updated = step(sched, {"A": 12, "B": 40})
    assert out.chunks == [
        ScheduledChunk("A", [11], 4, [0, 3], True, False),
        ScheduledChunk("B", [27, 28, 29], 7, [1, 2, 4], True, True),
    ]
    assert [(r.request_id, r.output_token_ids) for r in updated] == [
        ("A", [10, 11, 12]),
        ("B", [40]),
    ]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_in_whole() -> None:
    cfg = config(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    sched = Scheduler(cfg)
    sched.add_request(Request("A", list(range(10)), max_tokens=4))
    sched.add_request(Request("B", list(range(100, 110)), max_tokens=4))
    out, _ = step(sched, {"A": 1})
    assert [(c.request_id, c.start_position, len(c.token_ids)) for c in out.chunks] == [
        ("A", 0, 10)
    ]
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    out, _ = step(sched, {"A": 2, "B": 3})
    assert [(c.request_id, c.start_position, len(c.token_ids)) for c in out.chunks] == [
        ("A", 10, 1),
        ("B", 0, 10),
    ]


def test_max_num_seqs_caps_running_requests() -> None:
    sched = Scheduler(config(max_num_seqs=2))
    for rid in "ABC":
        sched.add_request(Request(rid, [1, 2], max_tokens=2))
    out, _ = step(sched, {"A": 5, "B": 6})
    assert [c.request_id for c in out.chunks] == ["A", "B"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    out, updated = step(sched, {"A": 7, "B": 8})
    assert [c.request_id for c in out.chunks] == ["A", "B"]
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in updated)
    out, _ = step(sched, {"C": 9})
    assert [c.request_id for c in out.chunks] == ["C"]
    assert out.newly_finished_request_ids == ["A", "B"]


# ---- prefix caching -------------------------------------------------------------------


def test_prefix_hit_skips_computation() -> None:
    sched = Scheduler(config())
    prompt = list(range(1, 11))
    sched.add_request(Request("A", prompt, max_tokens=1))
    step(sched, {"A": 77})
    sched.add_request(Request("B", [*prompt[:8], 90, 91, 92], max_tokens=3))
    out, _ = step(sched, {"B": 5})
    assert out.chunks == [ScheduledChunk("B", [90, 91, 92], 8, [0, 1, 3], True, True)]
    request = sched.get_request("B")
    assert request is not None
    assert (request.num_cached_tokens, request.num_computed_tokens) == (8, 11)
    stats = sched.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)


def test_concurrent_identical_prompts_share_their_full_blocks() -> None:
    sched = Scheduler(config())
    prompt = list(range(50, 59))  # 9 tokens: 2 full blocks
    sched.add_request(Request("C", prompt, max_tokens=8))
    step(sched, {"C": 1})
    sched.add_request(Request("D", prompt, max_tokens=8))
    out, _ = step(sched, {"C": 2, "D": 3})
    assert out.chunks == [
        ScheduledChunk("C", [1], 9, [0, 1, 2], True, False),
        ScheduledChunk("D", [58], 8, [0, 1, 3], True, True),
    ]
    bm = sched.block_manager
    assert [bm.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert sched.stats.kv_cache_usage == 4 / 32


def test_skip_prefix_cache_computes_the_whole_prompt() -> None:
    sched = Scheduler(config())
    sched.add_request(Request("A", list(range(9)), max_tokens=1))
    step(sched, {"A": 1})
    sched.add_request(Request("B", list(range(9)), max_tokens=1, skip_prefix_cache=True))
    out, _ = step(sched, {"B": 1})
    assert out.chunks == [ScheduledChunk("B", list(range(9)), 0, [3, 4, 5], True, True)]
    assert (sched.stats.prefix_cache_queries, sched.stats.prefix_cache_hits) == (9, 0)


def test_reset_prefix_cache_waits_until_no_request_holds_blocks() -> None:
    sched = Scheduler(config())
    sched.add_request(Request("A", list(range(9)), max_tokens=2))
    step(sched, {"A": 1})
    assert sched.reset_prefix_cache() is False
    step(sched, {"A": 2})
    assert sched.reset_prefix_cache() is True
    sched.add_request(Request("B", list(range(9)), max_tokens=1))
    out, _ = step(sched, {"B": 1})
    assert (out.chunks[0].start_position, sched.stats.prefix_cache_hits) == (0, 0)


# ---- stops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fed", "status", "stop_reason"),
    [
        # EOS is ignored until min_tokens are generated, then stops (stop_reason None).
        ({"min_tokens": 2, "eos_token_ids": frozenset({7})}, [7, 7], "finished_stopped", None),
        ({"eos_token_ids": frozenset({7, 8})}, [3, 8], "finished_stopped", None),
        # ignore_eos generates through EOS until max_tokens.
        (
            {"ignore_eos": True, "eos_token_ids": frozenset({7}), "max_tokens": 3},
            [7, 7, 7],
            "finished_length",
            None,
        ),
        # Stop token ids apply under ignore_eos, after min_tokens, and are the stop_reason.
        (
            {"ignore_eos": True, "stop_token_ids": frozenset({9}), "min_tokens": 2},
            [9, 9],
            "finished_stopped",
            9,
        ),
        ({"max_tokens": 2}, [4, 5], "finished_length", None),
        # A prompt of 6 with max_model_len 16: ten tokens reach the limit.
        ({"max_tokens": 100}, list(range(10)), "finished_length", None),
    ],
)
def test_token_stops(
    kwargs: dict[str, object], fed: list[int], status: str, stop_reason: int | None
) -> None:
    sched = Scheduler(config(max_model_len=16, num_blocks=8))
    params: dict[str, object] = {"max_tokens": 20, **kwargs}
    request = Request("r", [1, 2, 3, 4, 5, 6], **params)  # type: ignore[arg-type]
    sched.add_request(request)
    for n, token in enumerate(fed):
        assert request.status is (RequestStatus.WAITING if n == 0 else RequestStatus.RUNNING)
        _, updated = step(sched, {"r": token})
        assert updated == [request]
    assert request.output_token_ids == fed
    assert (request.status.value, request.stop_reason) == (status, stop_reason)
    assert request.finish_reason == ("stop" if status == "finished_stopped" else "length")
    assert sched.stats.num_free_blocks == 8 and not sched.has_unfinished_requests()


def test_a_prompt_of_max_model_len_samples_once() -> None:
    sched = Scheduler(config(max_model_len=8, num_blocks=8))
    sched.add_request(Request("r", list(range(8)), max_tokens=5))
    _, (request,) = step(sched, {"r": 3})
    assert (request.output_token_ids, request.finish_reason) == ([3], "length")


# ---- aborts ---------------------------------------------------------------------------


def test_abort_frees_blocks_and_is_reported_once() -> None:
    sched = Scheduler(config(max_num_seqs=1, max_num_batched_tokens=4))
    a = Request("A", list(range(9)), max_tokens=4)
    b = Request("B", [1], max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, {})
    assert (a.block_ids, sched.stats.num_free_blocks) == ([0], 31)
    assert sched.abort_requests(["A", "B", "unknown"]) == [a, b]
    assert [(r.status, r.finish_reason, r.block_ids) for r in (a, b)] == [
        (RequestStatus.FINISHED_ABORTED, "abort", [])
    ] * 2
    assert (sched.stats.num_free_blocks, sched.num_running, sched.num_waiting) == (32, 0, 0)
    assert sched.finish_request("A", RequestStatus.FINISHED_ABORTED) is None
    assert sched.abort_requests(["A"]) == []
    out = sched.schedule()
    assert (out.chunks, out.newly_finished_request_ids) == ([], ["A", "B"])
    assert sched.schedule().newly_finished_request_ids == []


def test_a_request_finished_while_its_step_runs_ends_when_update_gets_the_step() -> None:
    sched = Scheduler(config())
    sched.add_request(Request("A", [1, 2, 3], max_tokens=4))
    sched.add_request(Request("B", [4, 5, 6], max_tokens=4))
    out = sched.schedule()
    stopped = sched.finish_request("A", RequestStatus.FINISHED_STOPPED, stop_reason="bye")
    assert stopped is not None
    # the step may still be writing its blocks: it holds them until the step returns
    assert stopped.status is RequestStatus.RUNNING and stopped.block_ids == [0]
    assert sched.get_request("A") is stopped
    assert sched.finish_request("A", RequestStatus.FINISHED_ABORTED) is None  # once
    updated = sched.update(out, {"A": [9], "B": [8]})
    assert [(r.request_id, r.output_token_ids) for r in updated] == [("B", [8])]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", "bye")
    assert stopped.output_token_ids == [] and stopped.block_ids == []
    assert sched.get_request("A") is None
    assert sched.schedule().newly_finished_request_ids == ["A"]


# ---- preemption and random runs -------------------------------------------------------


def test_preemption_takes_the_newest_running_request_and_resumes_it_first() -> None:
    cfg = config(max_num_seqs=3, max_model_len=16, num_blocks=4, enable_prefix_caching=False)
    sched = Scheduler(cfg)
    a = Request("A", [1, 2, 3, 4], max_tokens=2)
    b = Request("B", [5, 6, 7, 8], max_tokens=2)
    c = Request("C", list(range(10, 18)), max_tokens=4)
    for request in (a, b, c):
        sched.add_request(request)
    out, _ = step(sched, {"A": 10, "B": 20, "C": 30})
    assert [(ch.request_id, ch.block_ids) for ch in out.chunks] == [
        ("A", [0]),
        ("B", [1]),
        ("C", [2, 3]),
    ]
    sched.add_request(Request("D", [7, 7, 7, 7], max_tokens=1))
    # A and B each need a fifth-token block; none is free, so C (the newest) goes.
    out, _ = step(sched, {"A": 11, "B": 21})
    assert out.chunks == [
        ScheduledChunk("A", [10], 4, [0, 3], True, False),
        ScheduledChunk("B", [20], 4, [1, 2], True, False),
    ]
    assert out.preempted_request_ids == ["C"]
    assert (c.status, c.num_computed_tokens, c.block_ids, c.output_token_ids) == (
        RequestStatus.PREEMPTED,
        0,
        [],
        [30],
    )
    assert (sched.num_waiting, sched.stats.num_preemptions_total, c.num_preemptions) == (2, 1, 1)
    # C resumes ahead of D, recomputing its prompt and its output token.
    out, _ = step(sched, {"C": 31, "D": 40})
    assert out.chunks == [
        ScheduledChunk("C", [*range(10, 18), 30], 0, [3, 0, 2], True, True),
        ScheduledChunk("D", [7, 7, 7, 7], 0, [1], True, True),
    ]
    assert out.newly_finished_request_ids == ["A", "B"]
    assert c.output_token_ids == [30, 31]


PRESSURE_SPECS = [
    Spec("r0", tuple(range(1, 6)), max_tokens=12),
    Spec("r1", tuple(range(10, 19)), max_tokens=10),
    Spec("r2", tuple(range(20, 27)), max_tokens=14),
    Spec("r3", (1, 2, 3, 4, 5, 40, 41, 42, 43, 44, 45, 46), max_tokens=8),
    Spec("r4", tuple(range(60, 66)), max_tokens=11),
]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_by_recompute_keeps_outputs_identical(
    prefix_caching: bool, chunked: bool
) -> None:
    arrivals = {0: PRESSURE_SPECS[:4], 3: PRESSURE_SPECS[4:]}
    common = dict(
        max_num_seqs=4,
        max_num_batched_tokens=32 if not chunked else 8,
        max_model_len=32,
        block_size=4,
        enable_prefix_caching=prefix_caching,
        enable_chunked_prefill=chunked,
    )
    tight, tight_sched = run(SchedulerConfig(num_blocks=8, **common), arrivals)  # type: ignore[arg-type]
    roomy, roomy_sched = run(SchedulerConfig(num_blocks=64, **common), arrivals)  # type: ignore[arg-type]
    assert tight_sched.stats.num_preemptions_total > 0
    assert roomy_sched.stats.num_preemptions_total == 0
    assert sum(r.num_preemptions for r in tight.values()) == (
        tight_sched.stats.num_preemptions_total
    )
    for spec in PRESSURE_SPECS:
        expected, status = spec.reference(32)
        for runs in (tight, roomy):
            request = runs[spec.request_id]
            assert (request.output_token_ids, request.status) == (expected, status)


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_keep_invariants_and_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    max_model_len = 24
    chunked = rng.random() < 0.7
    max_num_seqs = rng.randint(2, 4)
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
        prompt = (rng.choice(bases) + suffix)[:max_model_len]
        spec = Spec(
            f"q{i}",
            prompt,
            max_tokens=rng.randint(1, 12),
            min_tokens=rng.randint(0, 1),
            eos=frozenset(range(50)),  # about one token in twenty ends a request early
        )
        arrivals.setdefault(rng.randint(0, 25), []).append(spec)
    done, sched = run(cfg, arrivals, abort_rng=random.Random(seed + 100))
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
