"""One model step through a platform's whole-model executor (OpenVINO, XLA, ...).

The executor replaces the core model and attention but not the batching: the same
flat batch :func:`kvrun.engine.model_runner.build_batch` builds for the core model is
handed over, and this module only decides which rows need logits and splits them
back into sampling rows and whole-chunk prompt logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrun.engine.model_runner import StepLogits, build_batch
from kvrun.platforms.base import ModelExecutor
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["execute_with_executor", "logits_rows"]


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


def execute_with_executor(
    executor: ModelExecutor,
    chunks: Sequence[ScheduledChunk],
    prompt_logits_for: frozenset[str],
    block_size: int,
    device: torch.device,
) -> StepLogits:
    """Run one step through ``executor``; the same result the core model's runner gives."""
    batch = build_batch(chunks, block_size, device)
    starts = batch.meta.query_start_loc.tolist()
    wanted = [i for i, c in enumerate(chunks) if c.request_id in prompt_logits_for]
    rows, spans = logits_rows(
        batch.sample_indices.tolist(), [(starts[i], starts[i + 1]) for i in wanted]
    )
    indices = torch.tensor(rows, dtype=torch.int64, device=device)
    logits = executor.execute(batch.input_ids, batch.positions, batch.meta, indices)
    num_samples = len(batch.sample_chunks)
    prompt_logits = {
        chunks[i].request_id: logits[a:b] for i, (a, b) in zip(wanted, spans, strict=True)
    }
    return StepLogits(
        logits=logits[:num_samples],
        request_ids=[chunks[i].request_id for i in batch.sample_chunks],
        prompt_logits=prompt_logits,
    )
