"""The eager step runner: the core model over the platform's paged KV cache.

It owns the model weights and the KV cache on the platform device, turns the
scheduler's chunks into one flat batch (:func:`~kvrun.engine.batch.build_batch`), runs
the model (through the platform's fused decode step or captured decode graphs when
they take the step), and returns float32 logits only for the rows that sample (plus
whole-chunk logits for requests that asked for prompt logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvrun.engine.batch import StepLogits, build_batch
from kvrun.engine.step_runner import CausalLM
from kvrun.scheduling.output import ScheduledChunk

if TYPE_CHECKING:
    from kvrun.platforms.base import DecodeGraphRunner

__all__ = ["ModelRunner"]


class ModelRunner:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over the core model, in-process."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        *,
        fused_decoder: DecodeGraphRunner | None = None,
        decode_graph: DecodeGraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # The platform's fused decode step (Platform.fused_decoder) and its captured decode
        # step (Platform.decode_graph_runner), tried in that order before the eager forward;
        # either returns None for a step it does not take. None = not offered.
        self.fused_decoder = fused_decoder
        self.decode_graph = decode_graph

    @torch.inference_mode()
    def commit_kv_cache(self) -> int:
        for cache in self.kv_caches:
            cache.zero_()
        return sum(cache.numel() * cache.element_size() for cache in self.kv_caches)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[ScheduledChunk], prompt_logits_for: frozenset[str] = frozenset()
    ) -> StepLogits:
        """Run one step; ``prompt_logits_for`` names requests whose chunk needs all logits."""
        batch = build_batch(chunks, self.block_size, self.device)
        hidden = None
        if self.fused_decoder is not None:
            hidden = self.fused_decoder.run(batch.input_ids, batch.positions, batch.meta)
        if hidden is None and self.decode_graph is not None:
            hidden = self.decode_graph.run(batch.input_ids, batch.positions, batch.meta)
        if hidden is None:
            hidden = self.model.forward(
                batch.input_ids, batch.positions, self.kv_caches, batch.meta
            )
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_indices))
        prompt_logits: dict[str, torch.Tensor] = {}
        if prompt_logits_for:
            starts = batch.meta.query_start_loc.tolist()
            for i, chunk in enumerate(chunks):
                if chunk.request_id in prompt_logits_for:
                    rows = hidden[starts[i] : starts[i + 1]]
                    prompt_logits[chunk.request_id] = self.model.compute_logits(rows)
        return StepLogits(
            logits=logits,
            request_ids=[chunks[i].request_id for i in batch.sample_chunks],
            prompt_logits=prompt_logits,
        )
