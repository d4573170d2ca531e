"""One model step: scheduler output in, logits of the sampling rows out.

The runner owns the model weights and the KV cache on the platform device. It
turns the scheduler's per-request chunks into one flat batch (token ids,
positions, cache slots, block tables), runs the model, and returns float32
logits only for the rows that sample (plus whole-chunk logits for requests that
asked for prompt logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.scheduling.output import ScheduledChunk

if TYPE_CHECKING:
    from kvrun.platforms.base import DecodeGraphRunner, ModelExecutor

__all__ = ["BatchInputs", "CausalLM", "ModelRunner", "StepLogits", "build_batch"]


class CausalLM(Protocol):
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


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


class ModelRunner:
    """Runs the model over the paged KV cache, one scheduler step at a time."""

    def __init__(
        self,
        model: CausalLM | None,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        executor: ModelExecutor | None = None,
    ) -> None:
        # --- whole-model executor (issue 7): exactly one of model / executor is set;
        # with an executor the KV cache lives in the executor and kv_caches is empty.
        assert (model is None) != (executor is None)
        self.executor = executor
        # --- end whole-model executor
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # The platform's fused decode step (Platform.fused_decoder) and its captured decode
        # step (Platform.decode_graph_runner), tried in that order before the eager forward;
        # set by the engine once the cache exists. None = not offered.
        self.fused_decoder: DecodeGraphRunner | None = None
        self.decode_graph: DecodeGraphRunner | None = None

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[ScheduledChunk], prompt_logits_for: frozenset[str] = frozenset()
    ) -> StepLogits:
        """Run one step; ``prompt_logits_for`` names requests whose chunk needs all logits."""
        if self.executor is not None:  # whole-model executor (issue 7)
            from kvrun.engine.executor_runner import execute_with_executor

            return execute_with_executor(
                self.executor, chunks, prompt_logits_for, self.block_size, self.device
            )
        assert self.model is not None
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
