"""The eager step runner: the core model over the platform's paged KV cache.

It owns the model weights and the KV cache on the platform device, turns the
scheduler's chunks into one flat batch (:func:`~kvrun.engine.batch.build_batch`), runs
the model (through the platform's fused decode step or captured decode graphs when
they take the step), and returns float32 logits only for the rows that sample (plus
whole-chunk logits for requests that asked for prompt logprobs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from kvrun.engine.batch import StepLogits, build_batch
from kvrun.engine.step_runner import CausalLM
from kvrun.multimodal.encoder_cache import EncoderCache, multimodal_step_inputs
from kvrun.scheduling.output import ScheduledChunk

if TYPE_CHECKING:
    from kvrun.engine.batch import BatchInputs
    from kvrun.lora.manager import LoraBatch, LoraManager
    from kvrun.platforms.base import DecodeGraphRunner

__all__ = ["LoraDecodeStep", "ModelRunner"]

logger = logging.getLogger(__name__)


@runtime_checkable
class LoraDecodeStep(Protocol):
    """A fused decode step (:meth:`kvrun.Platform.fused_decoder`) that can also add LoRA
    adapters (the cpu plugin's NativeDecoder); the runner hands it the slots once."""

    def attach_lora(
        self,
        layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],  # LoraManager.slot_tensors
        scales: torch.Tensor,  # [S] float32
    ) -> str | None:  # None: attached; else why steps with adapters cannot run in it
        ...

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: Any,
        lora_slots: torch.Tensor | None = None,  # [N] int64 each token's slot, -1: none
    ) -> torch.Tensor | None:  # as DecodeGraphRunner.run
        ...


class ModelRunner:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over the core model, in-process."""

    returns_hidden_states = True

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        *,
        fused_decoder: DecodeGraphRunner | None = None,
        decode_graph: DecodeGraphRunner | None = None,
        lora: LoraManager | None = None,
        mm_cache_size: int = 256,  # VLLM_MM_INPUT_CACHE_SIZE: encoder outputs kept
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
        self._pools_logits = bool(getattr(model, "pools_class_logits", False))
        # LoRA adapters' slots (enable_lora); a step where a token has an adapter runs in
        # the fused decode step where it takes adapters (LoraDecodeStep), else in the
        # model's own forward, which applies them (the graph path does not).
        self.lora = lora
        self._lora_decoder: LoraDecodeStep | None = None
        if lora is not None and fused_decoder is not None:
            why: str | None = "the platform's fused decode step takes no adapters"
            if isinstance(fused_decoder, LoraDecodeStep):
                why = fused_decoder.attach_lora(*lora.slot_tensors())
                self._lora_decoder = fused_decoder if why is None else None
            if why is not None:
                logger.info("decode steps with LoRA adapters run op by op: %s", why)
        # A multimodal model's encoder outputs by content hash (kvrun.multimodal).
        self.encoder_cache = (
            EncoderCache(mm_cache_size) if getattr(model, "supports_multimodal", False) else None
        )

    @torch.inference_mode()
    def commit_kv_cache(self) -> int:
        for cache in self.kv_caches:
            cache.zero_()
        return sum(cache.numel() * cache.element_size() for cache in self.kv_caches)

    @torch.inference_mode()
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits:
        """Run one step; ``prompt_logits_for`` names requests whose chunk needs all logits,
        ``hidden_for`` those whose chunk's hidden states go back (pooling)."""
        batch = build_batch(chunks, self.block_size, self.device)
        lora = self.lora_batch(chunks, batch) if self.lora is not None else None
        hidden = None
        # media rows: the model's encoder outputs and M-RoPE positions; a step without
        # media rows only shifts positions (the rope delta) and takes the usual paths
        positions, embeds = self.media_inputs(chunks, batch)
        if embeds is not None:
            mm_model: Any = self.model  # a model that declares supports_multimodal
            hidden = mm_model.forward(
                batch.input_ids, positions, self.kv_caches, batch.meta, lora=lora,
                inputs_embeds=embeds,
            )  # fmt: skip
        if hidden is None and lora is not None and self._lora_decoder is not None:
            hidden = self._lora_decoder.run(
                batch.input_ids, positions, batch.meta, lora_slots=lora.slots
            )
        if hidden is None and lora is not None:
            model: Any = self.model  # a model whose supports_lora the builder checked
            hidden = model.forward(
                batch.input_ids, positions, self.kv_caches, batch.meta, lora=lora
            )
        if hidden is None and self.fused_decoder is not None:
            hidden = self.fused_decoder.run(batch.input_ids, positions, batch.meta)
        if hidden is None and self.decode_graph is not None:
            hidden = self.decode_graph.run(batch.input_ids, positions, batch.meta)
        if hidden is None:
            hidden = self.model.forward(batch.input_ids, positions, self.kv_caches, batch.meta)
        # pooling requests sample nothing: no logits for their last rows
        keep = [
            j for j, i in enumerate(batch.sample_chunks) if chunks[i].request_id not in hidden_for
        ]
        sampling = [batch.sample_chunks[j] for j in keep]
        indices = batch.sample_indices[keep] if hidden_for else batch.sample_indices
        logits = self.model.compute_logits(hidden.index_select(0, indices))
        prompt_logits: dict[str, torch.Tensor] = {}
        hidden_rows: dict[str, torch.Tensor] = {}
        if prompt_logits_for or hidden_for:
            starts = batch.meta.query_start_loc.tolist()
            for i, chunk in enumerate(chunks):
                rows = hidden[starts[i] : starts[i + 1]]
                if chunk.request_id in prompt_logits_for:
                    prompt_logits[chunk.request_id] = self.model.compute_logits(rows)
                if chunk.request_id in hidden_for:
                    # a classifier's rows are its class logits (its head is linear, so
                    # pooling them equals scoring the pooled state)
                    hidden_rows[chunk.request_id] = (
                        self.model.compute_logits(rows) if self._pools_logits else rows
                    )
        return StepLogits(
            logits=logits,
            request_ids=[chunks[i].request_id for i in sampling],
            prompt_logits=prompt_logits,
            hidden=hidden_rows,
        )

    def media_inputs(
        self, chunks: Sequence[ScheduledChunk], batch: BatchInputs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's rotary positions and, where a chunk covers media rows, its input
        embeddings (kvrun.multimodal.encoder_cache). A later pipeline stage of a media
        model (its ``parallel`` not the first stage) gets the positions only: it starts
        from the previous stage's residual stream, and only stage 0 encodes."""
        if self.encoder_cache is None or all(c.multi_modal is None for c in chunks):
            return batch.positions, None
        mm_model: Any = self.model  # a model that declares supports_multimodal
        first = getattr(getattr(mm_model, "parallel", None), "first_stage", True)
        return multimodal_step_inputs(
            chunks,
            batch.positions,
            self.encoder_cache,
            mm_model.encode,
            mm_model.embed_tokens,
            batch.input_ids,
            with_embeddings=first,
        )

    def lora_batch(self, chunks: Sequence[ScheduledChunk], batch: BatchInputs) -> LoraBatch | None:
        """The step's adapters in their slots, each token's slot; None when no chunk has one."""
        assert self.lora is not None
        if not any(chunk.lora_id for chunk in chunks):
            return None
        slots = self.lora.activate([chunk.lora_id for chunk in chunks])
        per_token = torch.repeat_interleave(
            torch.tensor(slots, dtype=torch.int64),
            torch.tensor(batch.meta.query_lens, dtype=torch.int64),
        )
        return self.lora.batch(per_token.to(self.device))
