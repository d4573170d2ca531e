"""The collectives a sharded model calls, over the platform's torch.distributed backend.

One :class:`Communicator` per rank. Every rank of a tensor-parallel group calls the
same collectives in the same order (the model's forward is the same code on each), and
stage s sends to stage s+1 exactly what stage s+1 receives, so nothing waits forever.
gloo, NCCL and RCCL sum an all-reduce so that every rank gets the same bits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvrun.distributed.state import ProcessGroups

__all__ = ["Communicator"]


class Communicator:
    """Tensor-parallel all-reduce and gather, pipeline send and receive."""

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        parallel = groups.parallel
        pp_rank, tp_rank = parallel.coordinates(groups.rank)
        self.tp_size = parallel.tensor_parallel_size
        self.tp_rank = tp_rank
        # the peers of this rank's pipeline neighbours: the same tp_rank one stage away
        last = parallel.pipeline_parallel_size - 1
        self.prev_rank = parallel.rank_of(pp_rank - 1, tp_rank) if pp_rank > 0 else None
        self.next_rank = parallel.rank_of(pp_rank + 1, tp_rank) if pp_rank < last else None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the tensor-parallel group, in place."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.groups.tp_group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """On tp_rank 0: the group's ``x`` ([B, n] each) side by side, [B, n * tp_size],
        in tp_rank order. Elsewhere: ``x`` itself (meaningless past this call)."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        first = self.groups.tp_ranks[0]
        if self.tp_rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.tp_size)]
            dist.gather(x, parts, dst=first, group=self.groups.tp_group)
            return torch.cat(parts, dim=-1)
        dist.gather(x, None, dst=first, group=self.groups.tp_group)
        return x

    def send_next(self, x: torch.Tensor) -> None:
        """Hand ``x`` to this rank's peer in the next stage."""
        assert self.next_rank is not None, "the last stage sends nothing"
        dist.send(x.contiguous(), dst=self.next_rank)

    def recv_prev(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """What this rank's peer in the previous stage sent (of that shape and dtype)."""
        assert self.prev_rank is not None, "stage 0 receives nothing"
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=self.prev_rank)
        return out
