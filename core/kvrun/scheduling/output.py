"""What the scheduler hands the model runner each step, and its counters for metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at run time in the scheduler
    from kvrun.multimodal.inputs import MultiModalInputs

__all__ = ["ScheduledChunk", "SchedulerOutput", "SchedulerStats"]


@dataclass(frozen=True)
class ScheduledChunk:
    """One request's work in one step: compute ``token_ids`` at consecutive positions.

    The chunk's tokens attend to the request's ``start_position`` tokens already in its
    blocks plus themselves (causally); their K/V go to slots ``start_position + j``.
    """

    request_id: str
    # [q] the tokens to compute this step: a prompt chunk, a recompute after preemption
    # (prompt + generated tokens), or the last sampled token for a decode.
    token_ids: list[int]
    # Position of token_ids[0]; equals the request's num_computed_tokens before this step
    # (the prefix-cache hit for a request's first chunk).
    start_position: int
    # The request's whole block table after this step's allocation; covers at least
    # start_position + q tokens. Token at position p lives in block_ids[p // block_size].
    block_ids: list[int]
    # True when the chunk reaches the end of the request's known tokens: the runner
    # samples one next token from the logits of token_ids[-1].
    samples: bool
    # True for a prompt chunk or a recompute (q > 1, or a request with no output yet);
    # False for a plain decode of the last sampled token.
    is_prefill: bool
    # The request's LoRA adapter (Request.lora_id); 0 = none.
    lora_id: int = 0
    # The request's media (Request.multi_modal): the runner writes the encoder rows this
    # chunk covers into its input embeddings and uses the M-RoPE positions. None = text.
    multi_modal: MultiModalInputs | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's batch. Chunks are in schedule order: running requests, then admitted ones."""

    chunks: list[ScheduledChunk]
    num_batched_tokens: int  # sum of len(chunk.token_ids); <= max_num_batched_tokens
    # Requests that lost their blocks this step; they are back in the waiting queue and
    # will recompute from position 0, so the runner drops any per-request state.
    preempted_request_ids: list[str]
    # Every request finished since the previous schedule: by a stop check in update, by
    # a stop string or an abort through finish_request. The runner drops their state.
    newly_finished_request_ids: list[str]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's gauges and counters (counters are cumulative)."""

    num_running: int  # requests holding KV blocks
    num_waiting: int  # requests waiting for admission, preempted ones included
    kv_cache_usage: float  # fraction of KV blocks held by requests, 0..1
    num_free_blocks: int  # clean plus evictable cached blocks
    num_blocks: int  # total KV blocks
    prefix_cache_queries: int  # tokens looked up in the prefix cache on admission
    prefix_cache_hits: int  # of those, tokens served from the cache
    num_preemptions_total: int  # preemptions since start
