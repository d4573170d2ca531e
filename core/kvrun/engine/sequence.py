"""Engine-side state of one request and its n sequences: text, logprobs, stops, deltas.

A user request with ``n`` samples becomes ``n`` scheduler requests (one per
sequence) that share the prompt and so share its cached KV blocks. This module
turns each sequence's new tokens into text (incrementally), applies stop strings,
and hands out what changed since the last step as a :class:`RequestDelta`. Nothing
here grows with the output per step: text is kept only as the part not yet handed
out plus the last few characters a stop string may span; logprobs only until they
are handed out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvrun.outputs import (
    Logprob,
    RequestDelta,
    RequestMetrics,
    SequenceDelta,
)
from kvrun.sampling.stop import find_stop, stop_holdback
from kvrun.sampling_params import SamplingParams
from kvrun.structured_output.compiler import ConstraintMatcher
from kvrun.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["ParentRequest", "SequenceState", "make_detokenizer"]


@dataclass
class SequenceState:
    """One of a request's n sequences; the scheduler carries it as the request payload."""

    parent: ParentRequest
    index: int  # 0..n-1
    params: SamplingParams  # this sequence's own params (its own seed when n > 1)
    generator: torch.Generator | None  # seeded sampling state, kept across steps
    detokenizer: IncrementalDetokenizer | None  # None when params.detokenize is False
    bad_words_ids: list[list[int]]
    eos_token_ids: frozenset[int]  # masked until min_tokens are generated
    # Structured output: this sequence's place in its grammar (set once it compiled).
    constraint: ConstraintMatcher | None = None
    token_ids: list[int] = field(default_factory=list)  # all generated (the sampler reads them)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Text: characters [0, sent_chars) were handed out; `unsent` is what follows them;
    # `tail` is the last (longest stop - 1) characters of all text, where a stop string
    # that the next token completes may start.
    num_chars: int = 0  # characters detokenized so far
    sent_chars: int = 0
    unsent: str = ""
    tail: str = ""
    final_chars: int | None = None  # the text's length once finished (cut at a stop string)
    sent_tokens: int = 0
    pending_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(
        self, token_id: int, logprobs: dict[int, Logprob] | None, *, text: bool = True
    ) -> str | None:
        """Record one generated token; returns the stop string it completed, if any.
        ``text=False``: the token adds nothing to the text (the EOS or stop token that
        ended the sequence, as vLLM leaves it out unless include_stop_str_in_output)."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.pending_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        if self.detokenizer is None or not text:
            return None
        new_text = self.detokenizer.add_tokens([token_id])
        if not new_text:
            return None
        window = self.tail + new_text
        self._append(new_text, window)
        stops = self.params.stop_strings
        if not stops:
            return None
        match = find_stop(window, len(new_text), stops, self.params.include_stop_str_in_output)
        if match is None:
            return None
        # match.text is window cut at the stop; window ends where all text ends.
        self.final_chars = self.num_chars - len(window) + len(match.text)
        return match.stop

    def _append(self, text: str, window: str) -> None:
        self.num_chars += len(text)
        self.unsent += text
        keep = max((len(s) for s in self.params.stop_strings), default=1) - 1
        self.tail = window[-keep:] if keep else ""

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if self.final_chars is None:
            if self.detokenizer is not None:
                rest = self.detokenizer.finish()  # a trailing partial character
                if rest:
                    self._append(rest, self.tail + rest)
            self.final_chars = self.num_chars

    def visible_chars(self) -> int:
        """Characters safe to show now: a possible stop-string prefix at the end is held."""
        if self.final_chars is not None:
            return self.final_chars
        stops = self.params.stop_strings
        return self.num_chars - (stop_holdback(self.tail, stops) if stops else 0)

    @property
    def changed(self) -> bool:
        """Whether there is something to hand out: new tokens, or the finish itself."""
        return len(self.token_ids) > self.sent_tokens or (self.finished and not self.finish_sent)

    def take_delta(self) -> SequenceDelta:
        """What changed since the previous call, which it marks as handed out."""
        visible = self.visible_chars()
        assert visible >= self.sent_chars, "streamed text is never taken back"
        count = visible - self.sent_chars
        text, self.unsent = self.unsent[:count], self.unsent[count:]
        self.sent_chars = visible
        new_ids = self.token_ids[self.sent_tokens :]
        self.sent_tokens = len(self.token_ids)
        wants_logprobs = self.params.logprobs is not None
        logprobs = self.pending_logprobs if wants_logprobs else None
        self.pending_logprobs = []
        self.finish_sent = self.finished
        return SequenceDelta(
            index=self.index,
            token_ids=new_ids,
            text=text,
            logprobs=logprobs,
            cumulative_logprob=self.cumulative_logprob if wants_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class ParentRequest:
    """A user request: the prompt and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    def take_delta(self) -> RequestDelta:
        """The sequences that changed since the previous call, and the prompt's
        logprobs the first time they are complete."""
        prompt_logprobs = None
        complete = self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(
            self.prompt_token_ids
        )
        if complete and not self.prompt_logprobs_sent:
            prompt_logprobs = self.prompt_logprobs
            self.prompt_logprobs_sent = True
        return RequestDelta(
            request_id=self.request_id,
            num_sequences=len(self.sequences),
            sequences=[s.take_delta() for s in self.sequences if s.changed],
            finished=self.finished,
            output_kind=self.params.output_kind,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=self.metrics.num_cached_tokens,
            metrics=self.metrics,
        )

    def mark_token(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now


def make_detokenizer(
    tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams
) -> IncrementalDetokenizer | None:
    if not params.detokenize:
        return None
    return IncrementalDetokenizer(
        tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
    )
