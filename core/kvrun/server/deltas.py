"""Cumulative engine outputs to wire deltas (engine side) and back (frontend side)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvrun.outputs import Logprob, RequestOutput
from kvrun.server.wire import CompletionDelta, LogprobEntry, RequestDelta

__all__ = ["DeltaEncoder", "RequestState", "SequenceState", "to_entries"]


def to_entries(position: dict[int, Logprob]) -> list[LogprobEntry]:
    """One position's logprobs, in the engine's order (the chosen token first)."""
    return [
        LogprobEntry(tid, lp.logprob, lp.rank, lp.decoded_token) for tid, lp in position.items()
    ]


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Sent:
    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0


@dataclass
class _RequestSent:
    sequences: dict[int, _Sent] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False


class DeltaEncoder:
    """Engine side: remembers what was sent per request and emits only the change."""

    def __init__(self) -> None:
        self._sent: dict[str, _RequestSent] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._sent.pop(request_id, None)

    def encode(self, output: RequestOutput) -> RequestDelta:
        state = self._sent.setdefault(output.request_id, _RequestSent())
        completions = []
        for seq in output.outputs:
            sent = state.sequences.setdefault(seq.index, _Sent())
            keep = _common_prefix(sent.text, seq.text)
            logprobs_tail = None
            if seq.logprobs is not None:
                logprobs_tail = [to_entries(p) for p in seq.logprobs[sent.num_logprobs :]]
                sent.num_logprobs = len(seq.logprobs)
            completions.append(
                CompletionDelta(
                    index=seq.index,
                    text_keep=keep,
                    text_tail=seq.text[keep:],
                    token_tail=list(seq.token_ids[sent.num_tokens :]),
                    logprobs_tail=logprobs_tail,
                    cumulative_logprob=seq.cumulative_logprob,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            sent.text = seq.text
            sent.num_tokens = len(seq.token_ids)
        prompt_logprobs = None
        if output.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            prompt_logprobs = [None if p is None else to_entries(p) for p in output.prompt_logprobs]
            state.prompt_logprobs_sent = True
        if output.finished:
            del self._sent[output.request_id]
        return RequestDelta(
            request_id=output.request_id,
            completions=completions,
            finished=output.finished,
            num_cached_tokens=output.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )


@dataclass
class SequenceState:
    """Frontend side: one of a request's n sequences, rebuilt from deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[LogprobEntry]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def apply(self, delta: CompletionDelta) -> None:
        self.text = self.text[: delta.text_keep] + delta.text_tail
        self.token_ids.extend(delta.token_tail)
        if delta.logprobs_tail is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs_tail)
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass
class RequestState:
    """Frontend side: a whole request (its n sequences and prompt logprobs) from deltas."""

    n: int
    sequences: list[SequenceState] = field(init=False)
    prompt_logprobs: list[list[LogprobEntry] | None] | None = None
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        self.sequences = [SequenceState(i) for i in range(self.n)]

    def apply(self, delta: RequestDelta) -> None:
        for completion in delta.completions:
            self.sequences[completion.index].apply(completion)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_cached_tokens = delta.num_cached_tokens

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)
