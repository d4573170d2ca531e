"""The engine's deltas onto the wire (engine side) and back into whole requests (frontend)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrun.outputs import Logprob
from kvrun.outputs import RequestDelta as EngineDelta
from kvrun.server.wire import CompletionDelta, LogprobEntry, RequestDelta

__all__ = ["RequestState", "SequenceState", "to_entries", "to_wire"]


def to_entries(position: dict[int, Logprob]) -> list[LogprobEntry]:
    """One position's logprobs, in the engine's order (the chosen token first)."""
    return [
        LogprobEntry(tid, lp.logprob, lp.rank, lp.decoded_token) for tid, lp in position.items()
    ]


def to_wire(delta: EngineDelta) -> RequestDelta:
    """One engine delta as the wire message (the same content, nothing accumulated)."""
    prompt_logprobs = None
    if delta.prompt_logprobs is not None:
        prompt_logprobs = [None if p is None else to_entries(p) for p in delta.prompt_logprobs]
    return RequestDelta(
        request_id=delta.request_id,
        completions=[
            CompletionDelta(
                index=seq.index,
                text=seq.text,
                token_ids=seq.token_ids,
                logprobs=None if seq.logprobs is None else [to_entries(p) for p in seq.logprobs],
                cumulative_logprob=seq.cumulative_logprob,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in delta.sequences
        ],
        finished=delta.finished,
        num_cached_tokens=delta.num_cached_tokens,
        prompt_logprobs=prompt_logprobs,
        pooled=None if delta.pooled is None else delta.pooled.tolist(),
        num_prompt_tokens=len(delta.prompt_token_ids),
    )


@dataclass
class SequenceState:
    """Frontend side: one of a request's n sequences, the sum of its deltas."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list[LogprobEntry]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        """All text so far (joined on each read: read it once, at the end)."""
        return "".join(self.text_parts)

    def apply(self, delta: CompletionDelta) -> None:
        if delta.text:
            self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
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
    # the prompt's length as the engine ran it (media expanded); None until a delta says
    num_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        self.sequences = [SequenceState(i) for i in range(self.n)]

    def apply(self, delta: RequestDelta) -> None:
        for completion in delta.completions:
            self.sequences[completion.index].apply(completion)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_cached_tokens = delta.num_cached_tokens
        self.note_prompt(delta)

    def note_prompt(self, delta: RequestDelta) -> None:
        """Keep the engine's prompt length (a delta the server made itself has none)."""
        if delta.num_prompt_tokens is not None:
            self.num_prompt_tokens = delta.num_prompt_tokens

    @property
    def num_generated(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)
