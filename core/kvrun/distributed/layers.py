"""What a sharded model (the Llama family and its mixtures, Gemma 2/3, DeepSeek-V2/V3)
does differently from a whole one.

:class:`ModelParallel` is handed to the model (``parallel=``); the model calls it at the
four places where ranks meet:

- the vocab-parallel embedding: each rank looks up the ids in its vocabulary slice
  (others give zero rows), then an all-reduce sums the one non-zero row per token;
- after the row-parallel o and down projections (a mixture's experts and shared expert
  together: one all-reduce for the whole mixture): an all-reduce of the partial sums;
- at a stage boundary: the residual stream goes to the next stage, which starts from it;
- the vocab-parallel lm_head: each rank's logit columns, gathered on tp_rank 0 and cut
  to the vocabulary (the padding rows' columns dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrun.distributed.communicator import Communicator
from kvrun.distributed.parallel import ShardLayout
from kvrun.ops import OpTable

__all__ = ["ModelParallel"]


@dataclass
class ModelParallel:
    """One rank's shard (``layout``) and the collectives that join it to the others."""

    layout: ShardLayout
    comm: Communicator

    @property
    def first_stage(self) -> bool:
        return self.layout.first_stage

    @property
    def last_stage(self) -> bool:
        return self.layout.last_stage

    @property
    def tensor_parallel(self) -> bool:
        return self.layout.tp_size > 1

    def embed(self, ops: OpTable, ids: torch.Tensor, table: object) -> torch.Tensor:
        """[T] ids -> [T, H]: the masked lookup in this rank's rows, summed over ranks."""
        if not self.tensor_parallel:
            return ops.embedding(ids, table)  # type: ignore[no-any-return]
        start = self.layout.vocab_start
        inside = (ids >= start) & (ids < start + self.layout.vocab_shard)
        rows: torch.Tensor = ops.embedding(torch.where(inside, ids - start, 0), table)
        rows = rows.masked_fill(~inside.unsqueeze(-1), 0)
        return self.comm.all_reduce(rows)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x)

    @property
    def partial_sum(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The all-reduce that completes a row-parallel projection's partial result, or
        None when this stage is not split across ranks (nothing to sum)."""
        return self.all_reduce if self.tensor_parallel else None

    def stage_input(
        self,
        ops: OpTable,
        ids: torch.Tensor,
        table: object,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """[T, H]: the first stage's embedding rows (:meth:`embed`), or the residual
        stream the previous stage ended with."""
        if self.first_stage:
            return self.embed(ops, ids, table)
        return self.receive_residual(ids.shape[0], hidden_size, dtype, device)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, vocab_shard] -> [B, V] on tp_rank 0 (the others' result is meaningless)."""
        if not self.tensor_parallel:
            return logits
        whole = self.comm.gather_columns(logits)
        return whole[:, : self.layout.vocab_size]

    def receive_residual(
        self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The residual stream the previous stage ended with, [T, H]."""
        return self.comm.recv_prev((num_tokens, hidden_size), dtype, device)

    def send_residual(self, residual: torch.Tensor) -> None:
        self.comm.send_next(residual)
