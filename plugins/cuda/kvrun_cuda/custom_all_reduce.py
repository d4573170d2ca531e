"""The tensor-parallel all-reduce over peer-to-peer GPU memory (vLLM's "custom all-reduce").

NCCL's all-reduce is built for bandwidth. A decode step's activations are small (16
tokens x 4096 x 2 bytes = 128 KiB per all-reduce, two per layer), where launch and
protocol latency dominate. When every GPU of a tensor-parallel group can read every
other's memory directly (NVLink or PCIe peer-to-peer), each rank copies its tensor into a
buffer that every peer has mapped (torch's symmetric memory,
``torch.distributed._symmetric_memory``), and one kernel sums the ranks' copies: "one
shot" (each rank reads every peer's whole tensor) up to :data:`ONE_SHOT_MAX_BYTES`, "two
shot" (each rank sums one slice, then every rank gathers the slices) up to the buffer's
size. Larger tensors, and other dtypes, go to NCCL. Both kernels sum the peers in the
same order on every rank, so every rank holds the same bits afterwards (the invariant
kvrun.distributed.communicator relies on).

The path is chosen once per group, by every rank together (:func:`choose`):

- every rank on one node (symmetric memory maps peers within a node);
- every pair of the group's GPUs passes :func:`kvrun_cuda.devices.peer_access`: the
  driver's report, then a copy between the two checked, unless VLLM_SKIP_P2P_CHECK=1
  (then the report is trusted);
- the activation dtype is float32 or bfloat16 (the dtypes torch's kernels sum);
- CUDA, not ROCm (RCCL's all-reduce runs there);
- the buffer allocates and every rank maps every peer's (a MIN all-reduce of each rank's
  success, so that no rank takes the path alone).

``--disable-custom-all-reduce`` (EngineArgs.disable_custom_all_reduce) skips all of it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvrun.distributed.state import ProcessGroups
from kvrun_cuda.devices import peer_access

__all__ = [
    "BUFFER_BYTES",
    "ONE_SHOT_MAX_BYTES",
    "GroupFacts",
    "SymmetricMemoryAllReduce",
    "choose",
    "custom_all_reduce",
    "verdict",
]

logger = logging.getLogger("kvrun.cuda")

# The shared buffer per rank: tensors up to this size take the peer-to-peer path. A
# prefill chunk of 8192 tokens x 4096 x 2 bytes is 64 MiB; such steps are bandwidth-
# bound and NCCL serves them as well, so the buffer is sized for decode and small chunks.
BUFFER_BYTES = 8 * 1024 * 1024
# Up to here every rank reads all peers' tensors (one kernel, lowest latency); above, the
# reduce-scatter + all-gather form moves (world - 1) / world of the bytes once each way.
ONE_SHOT_MAX_BYTES = 256 * 1024
SUMMABLE = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class GroupFacts:
    """What every rank of a tensor-parallel group reported (index = tp_rank)."""

    hosts: Sequence[str]  # each rank's node name
    devices: Sequence[int]  # each rank's CUDA device index on its node
    # each rank's peer access to every other rank's device: (ok, how it was decided)
    peers: Sequence[Mapping[int, tuple[bool, str]]]
    dtype: torch.dtype
    rocm: bool
    symmetric_memory: bool  # torch offers the symm_mem kernels


def verdict(facts: GroupFacts) -> tuple[bool, str]:
    """Whether the group may use the peer-to-peer all-reduce, and why (or why not).

    A pure function of facts every rank holds alike, so every rank decides the same."""
    if facts.rocm:
        return False, "ROCm: RCCL's all-reduce"
    if not facts.symmetric_memory:
        return False, "this torch build has no symmetric-memory all-reduce kernels"
    if len(set(facts.hosts)) > 1:
        return False, f"the group spans nodes {sorted(set(facts.hosts))}; peer memory is per node"
    if facts.dtype not in SUMMABLE:
        return (
            False,
            f"activations are {facts.dtype}; the peer-to-peer kernels sum float32, bfloat16",
        )
    for rank, seen in enumerate(facts.peers):
        for other, (ok, how) in sorted(seen.items()):
            if not ok:
                return False, (
                    f"GPU {facts.devices[rank]} cannot read GPU {other}'s memory ({how}); "
                    "VLLM_SKIP_P2P_CHECK=1 trusts the driver's report instead of checking"
                )
    how = {how for seen in facts.peers for _, how in seen.values()}
    return True, "every pair of GPUs has peer access: " + "; ".join(sorted(how))


class SymmetricMemoryAllReduce:
    """The all-reduce of one group over a buffer every rank has mapped (see the module)."""

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device):
        from torch.distributed import _symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffer: torch.Tensor | None = symm_mem.empty(
            BUFFER_BYTES // dtype.itemsize, dtype=dtype, device=device
        )
        self._handle = symm_mem.rendezvous(self.buffer, group)

    def all_reduce(self, x: torch.Tensor) -> bool:
        buffer = self.buffer
        nbytes = x.numel() * x.element_size()
        if (
            buffer is None
            or x.dtype != buffer.dtype
            or nbytes > BUFFER_BYTES
            or nbytes % 16  # the kernels move 16-byte vectors
            or not x.is_contiguous()
        ):
            return False
        flat = x.view(-1)
        staged = buffer[: flat.numel()]
        staged.copy_(flat)
        if nbytes <= ONE_SHOT_MAX_BYTES:
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        return True

    def close(self) -> None:
        self._handle = None
        self.buffer = None


def _has_symmetric_memory() -> bool:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return False
    ops = torch.ops.symm_mem
    return all(
        hasattr(ops, name) for name in ("one_shot_all_reduce_out", "two_shot_all_reduce_out")
    )


def choose(
    groups: ProcessGroups, dtype: torch.dtype, skip_p2p_check: bool
) -> tuple[GroupFacts, bool, str]:
    """Gather every rank's facts over the tensor-parallel group and decide (collective)."""
    group = groups.tp_group
    mine = torch.cuda.current_device()
    host = socket.gethostname()
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (host, mine), group=group)
    devices = [int(d) for _, d in gathered]  # type: ignore[misc]
    hosts = [str(h) for h, _ in gathered]  # type: ignore[misc]
    seen = {
        other: peer_access(mine, other, skip_p2p_check)
        for other, other_host in zip(devices, hosts, strict=True)
        if other != mine and other_host == host
    }
    reports: list[object] = [None] * len(devices)
    dist.all_gather_object(reports, seen, group=group)
    facts = GroupFacts(
        hosts=hosts,
        devices=devices,
        peers=[dict(r) for r in reports],  # type: ignore[call-overload]
        dtype=dtype,
        rocm=torch.version.hip is not None,
        symmetric_memory=_has_symmetric_memory(),
    )
    use, why = verdict(facts)
    return facts, use, why


def custom_all_reduce(
    groups: ProcessGroups, dtype: torch.dtype, skip_p2p_check: bool
) -> tuple[SymmetricMemoryAllReduce | None, str]:
    """The group's peer-to-peer all-reduce, or None with the reason (collective)."""
    _, use, why = choose(groups, dtype, skip_p2p_check)
    if not use:
        return None, why
    reducer: SymmetricMemoryAllReduce | None = None
    failure = ""
    try:
        reducer = SymmetricMemoryAllReduce(
            groups.tp_group, dtype, torch.device("cuda", torch.cuda.current_device())
        )
    except RuntimeError as exc:  # allocation or mapping refused by the driver
        failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    ok = torch.tensor([0 if reducer is None else 1], dtype=torch.int32, device="cuda")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=groups.tp_group)
    if int(ok.item()) == 0:
        if reducer is not None:
            reducer.close()
        where = f"here: {failure}" if failure else "on another rank"
        return None, f"symmetric memory could not be set up ({where})"
    return reducer, why
