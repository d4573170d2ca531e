"""Engine-side state of one request and its n sequences: text, logprobs, stops, outputs.

A user request with ``n`` samples becomes ``n`` scheduler requests (one per
sequence) that share the prompt and so share its cached KV blocks. This module
turns each sequence's new tokens into text (incrementally), applies stop strings,
collects logprobs, and builds the cumulative :class:`RequestOutput`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvrun.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvrun.sampling.stop import find_stop, stop_holdback
from kvrun.sampling_params import SamplingParams
from kvrun.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["ParentRequest", "SequenceState"]


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
    text: str = ""  # all detokenized text, stop string not yet removed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_text: str | None = None  # the text after stop-string truncation, once finished

    def add_token(self, token_id: int, logprobs: dict[int, Logprob] | None) -> str | None:
        """Record one generated token; returns the stop string it completed, if any."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        if self.detokenizer is None:
            return None
        new_text = self.detokenizer.add_tokens([token_id])
        self.text += new_text
        stops = self.params.stop or []
        if not stops or not new_text:
            return None
        match = find_stop(self.text, len(new_text), stops, self.params.include_stop_str_in_output)
        if match is None:
            return None
        self.final_text = match.text
        return match.stop

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if self.final_text is None:
            if self.detokenizer is not None:
                self.text += self.detokenizer.finish()  # a trailing partial character
            self.final_text = self.text

    def visible_text(self) -> str:
        """Text safe to show now: a possible stop-string prefix at the end is held back."""
        if self.final_text is not None:
            return self.final_text
        stops = self.params.stop or []
        if not stops:
            return self.text
        held = stop_holdback(self.text, stops)
        return self.text[: len(self.text) - held] if held else self.text

    def output(self) -> CompletionOutput:
        wants_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if wants_logprobs else None,
            logprobs=list(self.logprobs or []) if wants_logprobs else None,
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

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.output() for s in self.sequences],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.metrics.num_cached_tokens,
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
