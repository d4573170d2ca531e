"""Cumulative engine outputs travel as deltas and are rebuilt exactly on the other side."""

from __future__ import annotations

import msgspec

from kvrun.outputs import CompletionOutput, Logprob, RequestOutput
from kvrun.server.deltas import DeltaEncoder, RequestState
from kvrun.server.wire import EngineMessage, LogprobEntry, Outputs, Stats, engine_decoder


def _out(
    text: str,
    ids: list[int],
    *,
    finish: str | None = None,
    logprobs: list[dict[int, Logprob]] | None = None,
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None,
) -> RequestOutput:
    seq = CompletionOutput(0, text, ids, None, logprobs, finish, None)
    return RequestOutput("r", None, [5, 6], prompt_logprobs, [seq], finish is not None)


def _roundtrip(msg: EngineMessage) -> EngineMessage:
    return engine_decoder().decode(msgspec.msgpack.encode(msg))


def test_text_grows_then_a_stop_string_is_cut() -> None:
    enc = DeltaEncoder()
    state = RequestState(1)
    steps = [
        _out("Hel", [1]),
        _out("Hello wo", [1, 2, 3]),
        _out("Hello wor", [1, 2, 3, 4]),
        _out("Hello ", [1, 2, 3, 4], finish="stop"),  # "wor" + "ld" hit stop="world"
    ]
    seen = []
    for out in steps:
        delta = enc.encode(out)
        seen.append((delta.completions[0].text_keep, delta.completions[0].text_tail))
        state.apply(_roundtrip(Outputs([delta], [], Stats(0, 0, 0, 0, 0, 0, 0, 0), 0)).deltas[0])  # type: ignore[union-attr]
        assert state.sequences[0].text == out.outputs[0].text
        assert state.sequences[0].token_ids == out.outputs[0].token_ids
    assert seen == [(0, "Hel"), (3, "lo wo"), (8, "r"), (6, "")]
    assert state.sequences[0].finish_reason == "stop"


def test_multibyte_text_and_logprobs() -> None:
    enc = DeltaEncoder()
    state = RequestState(1)
    lp = [{7: Logprob(-0.5, 1, "é"), 8: Logprob(-1.5, 2, "e")}, {9: Logprob(-0.1, 1, "漢")}]
    prompt_lp: list[dict[int, Logprob] | None] = [None, {6: Logprob(-2.0, 3, "x")}]
    state.apply(enc.encode(_out("é", [7], logprobs=lp[:1], prompt_logprobs=prompt_lp)))
    second = enc.encode(_out("é漢", [7, 9], logprobs=lp, prompt_logprobs=prompt_lp))
    assert second.prompt_logprobs is None  # sent once
    state.apply(second)
    seq = state.sequences[0]
    assert seq.text == "é漢"
    assert seq.logprobs == [
        [LogprobEntry(7, -0.5, 1, "é"), LogprobEntry(8, -1.5, 2, "e")],
        [LogprobEntry(9, -0.1, 1, "漢")],
    ]
    assert state.prompt_logprobs == [None, [LogprobEntry(6, -2.0, 3, "x")]]


def test_finished_requests_and_aborts_are_forgotten() -> None:
    enc = DeltaEncoder()
    enc.encode(_out("a", [1]))
    enc.forget(["r"])
    # a fresh encoder state sends the whole text again
    assert enc.encode(_out("ab", [1, 2])).completions[0].text_tail == "ab"
    enc.encode(_out("abc", [1, 2, 3], finish="length"))
    assert enc.encode(_out("x", [4])).completions[0].token_tail == [4]
