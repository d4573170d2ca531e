"""One generation request as the scheduler sees it: token ids, limits and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at run time in the scheduler
    from kvrun.multimodal.inputs import MultiModalInputs

__all__ = ["Request", "RequestStatus"]


class RequestStatus(enum.Enum):
    """Where a request is in its life. The three FINISHED_* states are terminal."""

    WAITING = "waiting"  # added, never scheduled yet
    RUNNING = "running"  # owns KV blocks and is scheduled each step until it finishes
    PREEMPTED = "preempted"  # lost its blocks under memory pressure; waits to recompute
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the client or the engine

    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` of a terminal status; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
    }
)
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """A request's tokens, limits and scheduling state; mutable, owned by the scheduler.

    Invariants (kept by the scheduler, asserted on construction):
    - ``prompt_token_ids`` is non-empty and never changes.
    - Tokens are appended only through :meth:`append_output_token`, so ``all_token_ids``
      is always ``prompt_token_ids + output_token_ids``.
    - ``0 <= num_computed_tokens <= num_tokens``; a running request has
      ``num_computed_tokens < num_tokens`` between steps (its newest token still
      has to be fed to the model), a waiting or preempted one has 0.
    - ``block_ids`` covers at least ``num_computed_tokens`` tokens while running and is
      empty otherwise; with a sliding window on every layer its leading entries may be
      ``NULL_BLOCK`` placeholders of blocks released out of the window.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int  # generated tokens at most (>= 1)
    min_tokens: int = 0  # EOS and stop_token_ids are ignored until this many are generated
    ignore_eos: bool = False  # keep generating past EOS (stop_token_ids still apply)
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    # time.monotonic() at arrival, for metrics; the scheduler orders requests by the order
    # they were added, never by this value.
    arrival_time: float = 0.0
    # Never serve this request's tokens from the prefix cache (its blocks are still
    # cached for others): set when the engine needs logits for every prompt position.
    skip_prefix_cache: bool = False
    # A pooling request (embeddings, scores): it samples nothing and finishes once its
    # whole prompt is computed; the runner hands the engine its hidden states instead.
    prompt_only: bool = False
    # The LoRA adapter the request runs with (its lora_int_id); 0 = none. The scheduler
    # runs at most SchedulerConfig.max_loras distinct adapters at once.
    lora_id: int = 0
    # Seeds the request's prefix-cache chain (its adapter's identity): requests share
    # cached blocks only when their salts are equal. b"" = the plain chain.
    cache_salt: bytes = b""
    # The prompt's processed media (kvrun.multimodal); the scheduler only hands it on to
    # the request's chunks. Its content hashes are part of cache_salt.
    multi_modal: MultiModalInputs | None = None
    # Opaque per-request state owned by the engine (sampling params, detokenizer); the
    # scheduler never reads it.
    payload: object = None

    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)  # tokens whose K/V are cached
    # Prompt tokens served by a prefix-cache hit on the first schedule (metrics only).
    num_cached_tokens: int = field(default=0, init=False)
    block_ids: list[int] = field(default_factory=list, init=False)  # the block table
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: str | None = field(default=None, init=False)  # "stop" | "length" | "abort"
    # The stop token id that ended the request (None for EOS and length), or the stop
    # string the engine matched.
    stop_reason: int | str | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)
    _all_token_ids: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        assert self.prompt_token_ids, f"request {self.request_id!r} has an empty prompt"
        assert self.max_tokens >= 1, f"max_tokens={self.max_tokens} must be >= 1"
        assert 0 <= self.min_tokens <= self.max_tokens, (
            f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]"
        )
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by output tokens. The scheduler's own list: read, never mutate."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
