"""A step's flat batch and what a step returns: the data every step runner shares.

A leaf module (the scheduler's chunks in, tensors out): the eager runner, the
executor runner, profiling and the platforms' tests build batches here, and nothing
here imports a runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["BatchInputs", "StepLogits", "build_batch", "logits_rows"]


@dataclass
class BatchInputs:
    """A step's flat batch, on the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [S] int64: flat index of each sampling chunk's last token
    sample_chunks: list[int]  # [S] index into the chunk list of each sampling row


@dataclass
class StepLogits:
    """What one step produced for the sampler."""

    logits: torch.Tensor  # [S, V] float32, rows in the order of `request_ids`
    request_ids: list[str]  # [S] the sampling requests
    prompt_logits: dict[str, torch.Tensor]  # request_id -> [Q, V] float32 for its whole chunk
    # request_id -> [Q, H] the final hidden states of its whole chunk (pooling requests)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)


def build_batch(
    chunks: Sequence[ScheduledChunk], block_size: int, device: torch.device
) -> BatchInputs:
    """Flatten the chunks into one batch; pure host-side bookkeeping plus one copy each."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    sample_indices: list[int] = []
    sample_chunks: list[int] = []
    max_blocks = 0
    for i, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        start = chunk.start_position
        input_ids.extend(chunk.token_ids)
        positions.extend(range(start, start + n))
        blocks = chunk.block_ids
        slots.extend(
            blocks[p // block_size] * block_size + p % block_size for p in range(start, start + n)
        )
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        query_lens.append(n)
        max_blocks = max(max_blocks, len(blocks))
        if chunk.samples:
            sample_indices.append(query_start[-1] - 1)
            sample_chunks.append(i)
    tables = [c.block_ids + [0] * (max_blocks - len(c.block_ids)) for c in chunks]

    def tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        num_tokens=len(input_ids),
        slot_mapping=tensor(slots, torch.int64),
        query_start_loc=tensor(query_start, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        query_lens=query_lens,
        seq_lens_host=seq_lens,
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return BatchInputs(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        meta=meta,
        sample_indices=tensor(sample_indices, torch.int64),
        sample_chunks=sample_chunks,
    )


def logits_rows(
    sample_indices: list[int], chunk_bounds: list[tuple[int, int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """All flat rows that need logits: the sampling rows, then each prompt chunk's rows.

    ``chunk_bounds`` holds the [start, end) token rows of each chunk that wants prompt
    logits. Returns the rows and, per such chunk, its [start, end) in the result.
    """
    rows = list(sample_indices)
    spans: list[tuple[int, int]] = []
    for start, end in chunk_bounds:
        spans.append((len(rows), len(rows) + end - start))
        rows.extend(range(start, end))
    return rows, spans
