"""From the engine's per-step deltas to vLLM-shaped RequestOutputs.

The engine hands out only what changed (:class:`~kvrun.outputs.RequestDelta`); this
keeps each request's whole output, appending each delta in O(its size), and builds a
:class:`~kvrun.outputs.RequestOutput` as the request's ``output_kind`` asks:
CUMULATIVE every step (a copy of everything so far, as vLLM gives it), DELTA every
step (only the new part), FINAL_ONLY once, when the request finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrun.outputs import (
    CompletionOutput,
    Logprob,
    RequestDelta,
    RequestOutput,
    RequestOutputKind,
    SequenceDelta,
)

__all__ = ["OutputAccumulator"]


@dataclass
class _Sequence:
    """One sequence's whole output so far."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    last: SequenceDelta | None = None  # the latest delta (finish and cumulative logprob)

    def add(self, delta: SequenceDelta) -> None:
        if delta.text:
            self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.last = delta

    def whole(self) -> CompletionOutput:
        last = self.last
        text = "".join(self.text_parts)
        self.text_parts = [text] if text else []  # joined once, not on every call
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=list(self.token_ids),
            cumulative_logprob=last.cumulative_logprob if last else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=last.finish_reason if last else None,
            stop_reason=last.stop_reason if last else None,
        )


def _new_part(delta: SequenceDelta) -> CompletionOutput:
    return CompletionOutput(
        index=delta.index,
        text=delta.text,
        token_ids=delta.token_ids,
        cumulative_logprob=delta.cumulative_logprob,
        logprobs=delta.logprobs,
        finish_reason=delta.finish_reason,
        stop_reason=delta.stop_reason,
    )


@dataclass
class _Request:
    sequences: dict[int, _Sequence] = field(default_factory=dict)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputAccumulator:
    """Feed it every delta of the engine's steps; it answers RequestOutputs."""

    def __init__(self) -> None:
        self._requests: dict[str, _Request] = {}

    def add(self, delta: RequestDelta) -> RequestOutput | None:
        """The RequestOutput this delta makes, or None (FINAL_ONLY before the end)."""
        kind = delta.output_kind
        if kind is RequestOutputKind.DELTA:
            # Nothing to keep: each output is the delta itself.
            self._requests.pop(delta.request_id, None)
            return self._output(
                delta, [_new_part(d) for d in delta.sequences], delta.prompt_logprobs
            )
        request = self._requests.setdefault(delta.request_id, _Request())
        for seq in delta.sequences:
            request.sequences.setdefault(seq.index, _Sequence(seq.index)).add(seq)
        if delta.prompt_logprobs is not None:
            request.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            del self._requests[delta.request_id]
        elif kind is RequestOutputKind.FINAL_ONLY:
            return None
        sequences = request.sequences
        outputs = [(sequences.get(i) or _Sequence(i)).whole() for i in range(delta.num_sequences)]
        return self._output(delta, outputs, request.prompt_logprobs)

    def forget(self, request_id: str) -> None:
        """Drop an aborted request's state."""
        self._requests.pop(request_id, None)

    @staticmethod
    def _output(
        delta: RequestDelta,
        outputs: list[CompletionOutput],
        prompt_logprobs: list[dict[int, Logprob] | None] | None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=delta.request_id,
            prompt=delta.prompt,
            prompt_token_ids=delta.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=delta.finished,
            metrics=delta.metrics,
            num_cached_tokens=delta.num_cached_tokens,
        )
