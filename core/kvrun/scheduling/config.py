"""The scheduler's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.errors import ConfigError
from kvrun.scheduling.capacity import require_blocks

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine's scheduler. Raises ConfigError for values it cannot run with."""

    max_num_seqs: int  # running requests at most
    max_num_batched_tokens: int  # tokens computed per step at most (prefill chunks + decodes)
    max_model_len: int  # prompt + generated tokens at most
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the cache
    enable_prefix_caching: bool = True
    # When False a prompt (or a recompute) must fit whole in one step's token budget.
    enable_chunked_prefill: bool = True
    # Distinct LoRA adapters among running requests at most (the engine's device slots);
    # 0 = no adapters run (LoRA disabled), so nothing is counted.
    max_loras: int = 0
    # The sliding window (positions) of a model whose every attention layer has one, on
    # a backend that computes it; None = some layer attends globally. A running request
    # then releases its blocks that no later query can see, so it holds about
    # sliding_window / block_size blocks however long it grows, and the cache need only
    # hold one step's span (kvrun.scheduling.capacity.blocks_needed).
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            _require_positive(name, getattr(self, name))
        _require_positive("block_size", self.block_size)
        _require_positive("num_blocks", self.num_blocks)
        if self.sliding_window is not None:
            _require_positive("sliding_window", self.sliding_window)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise some running requests could never get a decode slot.
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below "
                f"max_num_seqs={self.max_num_seqs}; it must be >= max_num_seqs"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below "
                f"max_model_len={self.max_model_len} with chunked prefill disabled; it must "
                "be >= max_model_len, or enable chunked prefill"
            )
        require_blocks(
            self.num_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            holder=f"the scheduler's KV cache (num_blocks={self.num_blocks})",
            remedy="give the KV cache more memory or lower max_model_len",
            sliding_window=self.sliding_window,
            max_chunk_tokens=self.max_num_batched_tokens,
        )


def _require_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} is not accepted; it must be a positive integer")
