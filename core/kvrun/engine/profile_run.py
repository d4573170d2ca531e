"""The dummy forward that memory profiling measures: the engine's largest step.

The largest step the scheduler can send is ``max_num_batched_tokens`` new tokens
spread over ``min(max_num_seqs, tokens)`` prefilling requests, each of which then
samples, so the logits of those rows (``rows x vocab`` float32, often the biggest
single activation) are part of the peak too. The dummy writes its keys and values
into a throwaway cache just large enough for it, allocated inside the run so it
counts in the peak; that overstates the peak by those few blocks, which errs towards
a smaller cache, never an out-of-memory.

Device-neutral: built from the core's own batch builder; the platform only measures
(:meth:`kvrun.platforms.Platform.measure_peak_memory`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvrun.engine.batch import build_batch
from kvrun.engine.step_runner import CausalLM
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["dummy_chunks", "make_profile_run"]


def dummy_chunks(
    max_num_batched_tokens: int, max_num_seqs: int, block_size: int
) -> list[ScheduledChunk]:
    """``max_num_batched_tokens`` prompt tokens over as many requests as may run.

    Requests get consecutive, disjoint blocks numbered from 0; the first requests take
    one token more when the tokens do not divide evenly.
    """
    seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    base, extra = divmod(max_num_batched_tokens, seqs)
    chunks = []
    next_block = 0
    for i in range(seqs):
        n = base + (1 if i < extra else 0)
        blocks = -(-n // block_size)
        chunks.append(
            ScheduledChunk(
                request_id=f"profile-{i}",
                token_ids=[0] * n,
                start_position=0,
                block_ids=list(range(next_block, next_block + blocks)),
                samples=True,
                is_prefill=True,
            )
        )
        next_block += blocks
    return chunks


def make_profile_run(
    model: CausalLM,
    num_layers: int,
    layer_shape: Callable[[int], tuple[int, ...]],  # num_blocks -> one layer's cache shape
    cache_dtype: torch.dtype,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
    device: torch.device,
) -> Callable[[], None]:
    """A zero-argument callable running the largest step once, for measure_peak_memory."""

    @torch.inference_mode()
    def run() -> None:
        chunks = dummy_chunks(max_num_batched_tokens, max_num_seqs, block_size)
        num_blocks = sum(len(c.block_ids) for c in chunks)
        caches = [
            torch.zeros(layer_shape(num_blocks), dtype=cache_dtype, device=device)
            for _ in range(num_layers)
        ]
        batch = build_batch(chunks, block_size, device)
        hidden = model.forward(batch.input_ids, batch.positions, caches, batch.meta)
        model.compute_logits(hidden.index_select(0, batch.sample_indices))

    return run
