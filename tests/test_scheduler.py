"""Scheduler: exact chunks and block tables, stops, aborts, preemption, random-run invariants.

The end-to-end tests drive the scheduler with a deterministic stand-in for a model that
reads its context back from a paged slot store through each chunk's block table, so a
wrong table, a stale prefix hit or an unwritten slot changes the generated tokens
(tests/support/scheduling.py, shared with tests/test_scheduler_in_flight.py).
"""

from __future__ import annotations

import random

import pytest

from kvrun.errors import ConfigError
from kvrun.scheduling import Request, RequestStatus, ScheduledChunk, Scheduler, SchedulerConfig
from tests.support.scheduling import (
    PRESSURE_SPECS,
    check_against_reference,
    config,
    drive,
    random_workload,
    step,
)

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
    tight, tight_sched, _ = drive(SchedulerConfig(num_blocks=8, **common), arrivals)  # type: ignore[arg-type]
    roomy, roomy_sched, _ = drive(SchedulerConfig(num_blocks=64, **common), arrivals)  # type: ignore[arg-type]
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
    cfg, arrivals = random_workload(seed, max_seqs=4)
    done, sched, _ = drive(cfg, arrivals, abort_rng=random.Random(seed + 100))
    check_against_reference(done, arrivals, sched, cfg.max_model_len)
