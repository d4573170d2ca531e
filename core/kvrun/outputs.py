"""What a request produces: the offline API's and the server's view of a result.

Shaped like vLLM's RequestOutput/CompletionOutput so existing code ports by
changing an import. Every output is cumulative: text and token_ids hold all that
was generated so far, so a streaming consumer takes the delta since its last look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput", "SampleLogprobs"]


@dataclass(frozen=True)
class Logprob:
    """One candidate token's log-probability under the model's raw distribution."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# One dict per generated (or prompt) position: token id -> Logprob. Holds the chosen
# token and the top-N candidates.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One of the n sequences generated for a request."""

    index: int  # 0..n-1
    text: str  # detokenized output so far (stop string removed unless asked to keep it)
    token_ids: list[int]  # generated token ids so far
    cumulative_logprob: float | None  # sum of chosen tokens' logprobs when logprobs asked
    logprobs: SampleLogprobs | None  # one entry per generated token when logprobs asked
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class RequestOutput:
    """A request's state after an engine step."""

    request_id: str
    prompt: str | None  # the prompt text, when the request came as text
    prompt_token_ids: list[int]
    # One entry per prompt token; entry 0 is None (the first token has no logprob).
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = field(default=None, compare=False)
    num_cached_tokens: int = 0
