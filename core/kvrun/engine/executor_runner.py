"""The step runner over a platform's whole-model executor (OpenVINO, XLA, ...).

The executor replaces the core model and attention but not the batching: the same
flat batch :func:`kvrun.engine.batch.build_batch` builds for the core model is handed
over, and this module only decides which rows need logits and splits them back into
sampling rows and whole-chunk prompt logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrun.engine.batch import StepLogits, build_batch, logits_rows
from kvrun.platforms.base import ModelExecutor
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["ExecutorRunner", "execute_with_executor"]


class ExecutorRunner:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over a ModelExecutor whose KV
    cache is already initialised (``init_kv_cache`` ran)."""

    returns_hidden_states = False  # an executor hands back logits only

    def __init__(self, executor: ModelExecutor, device: torch.device) -> None:
        self.executor = executor
        self.block_size = executor.block_size
        self.device = device

    def commit_kv_cache(self) -> int:
        return 0  # the executor allocated and owns its cache (OpenVINO, XLA)

    @torch.inference_mode()
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits:
        if hidden_for:  # the builder refuses the pooling runner here; a caller's bug
            raise RuntimeError("a whole-model executor returns no hidden states (pooling)")
        return execute_with_executor(
            self.executor, chunks, prompt_logits_for, self.block_size, self.device
        )


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
