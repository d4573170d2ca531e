"""Engine deltas cross the wire unchanged and are summed back into whole requests."""

from __future__ import annotations

import msgspec

from kvrun.outputs import Logprob, RequestDelta, RequestMetrics, RequestOutputKind, SequenceDelta
from kvrun.scheduling import SchedulerStats
from kvrun.server.deltas import RequestState, to_wire
from kvrun.server.wire import EngineMessage, LogprobEntry, Outputs, engine_decoder
from kvrun.stats import EngineStats


def _delta(
    text: str,
    ids: list[int],
    *,
    finish: str | None = None,
    logprobs: list[dict[int, Logprob]] | None = None,
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None,
) -> RequestDelta:
    seq = SequenceDelta(0, ids, text, logprobs, None, finish, None)
    return RequestDelta(
        request_id="r",
        num_sequences=1,
        sequences=[seq],
        finished=finish is not None,
        output_kind=RequestOutputKind.CUMULATIVE,
        prompt=None,
        prompt_token_ids=[5, 6],
        prompt_logprobs=prompt_logprobs,
        num_cached_tokens=0,
        metrics=RequestMetrics(arrival_time=0.0),
    )


def _roundtrip(msg: EngineMessage) -> EngineMessage:
    return engine_decoder().decode(msgspec.msgpack.encode(msg))


def test_text_and_tokens_are_summed_in_order() -> None:
    state = RequestState(1)
    steps = [
        _delta("Hel", [1]),
        _delta("lo wo", [2, 3]),
        _delta("", [4]),
        _delta("", [], finish="stop"),
    ]
    for delta in steps:
        msg = _roundtrip(
            Outputs(
                [to_wire(delta)], [], EngineStats(SchedulerStats(0, 0, 0.0, 0, 0, 0, 0, 0), 0, 0), 0
            )
        )
        state.apply(msg.deltas[0])  # type: ignore[union-attr]
    assert state.sequences[0].text == "Hello wo"
    assert state.sequences[0].token_ids == [1, 2, 3, 4]
    assert state.sequences[0].finish_reason == "stop"


def test_multibyte_text_and_logprobs() -> None:
    state = RequestState(1)
    lp = [{7: Logprob(-0.5, 1, "é"), 8: Logprob(-1.5, 2, "e")}, {9: Logprob(-0.1, 1, "漢")}]
    prompt_lp: list[dict[int, Logprob] | None] = [None, {6: Logprob(-2.0, 3, "x")}]
    first = to_wire(_delta("é", [7], logprobs=lp[:1], prompt_logprobs=prompt_lp))
    state.apply(first)
    second = to_wire(_delta("漢", [9], logprobs=lp[1:]))
    assert second.prompt_logprobs is None  # the engine sends them once
    state.apply(second)
    seq = state.sequences[0]
    assert seq.text == "é漢"
    assert seq.logprobs == [
        [LogprobEntry(7, -0.5, 1, "é"), LogprobEntry(8, -1.5, 2, "e")],
        [LogprobEntry(9, -0.1, 1, "漢")],
    ]
    assert state.prompt_logprobs == [None, [LogprobEntry(6, -2.0, 3, "x")]]
