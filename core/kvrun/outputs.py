"""What a request produces: the offline API's and the server's view of a result.

Shaped like vLLM's RequestOutput/CompletionOutput so existing code ports by
changing an import. The engine emits :class:`RequestDelta` s (only what changed in a
step); :class:`~kvrun.engine.output_accumulator.OutputAccumulator` turns them into
``RequestOutput`` s as a request's ``SamplingParams.output_kind`` asks: cumulative
(text and token_ids hold all generated so far), delta (only the new part), or
final-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "CompletionOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "Logprob",
    "PoolingOutput",
    "PoolingRequestOutput",
    "RequestDelta",
    "RequestMetrics",
    "RequestOutput",
    "RequestOutputKind",
    "SampleLogprobs",
    "ScoringOutput",
    "ScoringRequestOutput",
    "SequenceDelta",
]


class RequestOutputKind(IntEnum):
    """What each RequestOutput of a request holds (vLLM's values)."""

    CUMULATIVE = 0  # everything generated so far, every step
    DELTA = 1  # only what this step added
    FINAL_ONLY = 2  # one output, when the request finishes


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


@dataclass(frozen=True)
class SequenceDelta:
    """What one step added to one of a request's n sequences.

    Tokens, text and logprobs only grow: concatenating a sequence's deltas gives its
    whole output (text held back while it may still become a stop string arrives in a
    later delta, or never when the stop string is cut).
    """

    index: int  # 0..n-1
    token_ids: list[int]  # generated since the previous delta (usually one)
    text: str  # text that follows what earlier deltas carried ("" while held back)
    logprobs: SampleLogprobs | None  # one entry per new token when logprobs were asked
    cumulative_logprob: float | None  # over all tokens so far, when logprobs were asked
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    stop_reason: int | str | None  # the stop string or stop token id that ended it


@dataclass(frozen=True)
class RequestDelta:
    """One request's progress in one engine step: only the sequences that changed."""

    request_id: str
    num_sequences: int  # the request's n
    sequences: list[SequenceDelta]  # those of the n that changed, by index
    finished: bool  # every sequence has finished; this is the request's last delta
    output_kind: RequestOutputKind  # the request's SamplingParams.output_kind
    prompt: str | None  # the prompt text, when the request came as text
    prompt_token_ids: list[int]  # the engine's own list: read it, do not change it
    # Sent once, in the first delta after the prompt's logprobs are all computed:
    # one entry per prompt token, entry 0 None.
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    metrics: RequestMetrics  # the engine's record of this request, updated in place
    # A pooling request's result (no sequences): its embedding or pooled vector, float32
    # on the host, in its one (finished) delta.
    pooled: torch.Tensor | None = None


# --- pooling (LLM.encode / embed / score), shaped as vLLM's ---------------------------


@dataclass(frozen=True)
class PoolingOutput:
    data: torch.Tensor  # the pooled vector, float32 on the host


@dataclass(frozen=True)
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class EmbeddingRequestOutput:
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass(frozen=True)
class ScoringOutput:
    score: float


@dataclass(frozen=True)
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]  # the first text's, then the second's
    finished: bool = True


@dataclass(frozen=True)
class ClassificationOutput:
    probs: list[float]  # one per class, in the model's label order

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(frozen=True)
class ClassificationRequestOutput:
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True
