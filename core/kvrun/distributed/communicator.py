"""The collectives a sharded model calls, over the platform's torch.distributed backend.

One :class:`Communicator` per rank. Every rank of a tensor-parallel group calls the
same collectives in the same order (the model's forward is the same code on each), and
stage s sends to stage s+1 exactly what stage s+1 receives, so nothing waits forever.
gloo, NCCL and RCCL sum an all-reduce so that every rank gets the same bits.

A platform may offer a faster all-reduce for its tensor-parallel group
(:meth:`kvrun.platforms.Platform.custom_all_reduce`: cuda's over peer-to-peer memory);
the communicator tries it first and falls back to the backend's. Its choice depends only
on the tensor's dtype and size, which are the same on every rank, so all ranks of the
group always take the same path.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from kvrun.distributed.state import ProcessGroups

__all__ = ["Communicator", "CustomAllReduce"]


class CustomAllReduce(Protocol):
    """A platform's all-reduce for one tensor-parallel group, used before the backend's."""

    def all_reduce(self, x: torch.Tensor) -> bool:
        """Sum ``x`` over the group in place and return True, or return False (``x``
        untouched) when this tensor is not for it (dtype, size). Every rank of the group
        must get the same answer for tensors of the same dtype and shape."""
        ...

    def close(self) -> None:
        """Release what it holds (shared buffers)."""
        ...


class Communicator:
    """Tensor-parallel all-reduce and gather, pipeline send and receive."""

    def __init__(self, groups: ProcessGroups, custom: CustomAllReduce | None = None) -> None:
        self.groups = groups
        self.custom = custom  # the platform's faster all-reduce, when it offered one
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
        if self.tp_size > 1 and not (self.custom is not None and self.custom.all_reduce(x)):
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
