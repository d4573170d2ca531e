"""torch.distributed for one rank: the rendezvous address, the process groups.

The rendezvous is a ``torch.distributed.TCPStore`` that rank 0 serves at
``init_method`` (``tcp://HOST:PORT``); every rank connects to it within a bounded time,
then joins the default group (the platform's backend: gloo on cpu, NCCL on cuda and
rocm) and the tensor-parallel group of its pipeline stage.

Addresses (vLLM's variables): VLLM_HOST_IP is the address this node uses for
collectives, VLLM_PORT the first port kvrun binds for them (further ports count up
from it). Unset, a single machine's ranks meet on 127.0.0.1 at a free port. gloo picks
its own interface from the host name, which may be an outward address: when the
rendezvous is on loopback (or GLOO_SOCKET_IFNAME is unset and the address is this
node's), gloo is told the interface that holds the address.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from kvrun.distributed.parallel import ParallelConfig
from kvrun.envs import EnvSnapshot
from kvrun.errors import KvrunError

__all__ = [
    "DistributedError",
    "ProcessGroups",
    "find_free_port",
    "init_method",
    "init_process_groups",
    "interface_holding",
    "node_ip",
    "rendezvous_address",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Ports tried upward from VLLM_PORT before giving up (vLLM scans without a bound).
PORT_SCAN = 64
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class DistributedError(KvrunError):
    """A rank could not join its peers (rendezvous, backend, group set-up)."""


def _interface_address(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(
                sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode())
            )
        except OSError:  # no IPv4 address (or the interface is gone)
            return None
    return socket.inet_ntoa(packed[20:24])


def _interfaces() -> dict[str, str]:
    """Interface name -> its IPv4 address, for the interfaces that have one."""
    found = {}
    for _, name in socket.if_nameindex():
        address = _interface_address(name)
        if address is not None:
            found[name] = address
    return found


def interface_holding(address: str) -> str | None:
    """The name of this node's interface with IPv4 ``address``; None if none has it."""
    for name, held in _interfaces().items():
        if held == address:
            return name
    return None


def node_ip(env: EnvSnapshot) -> str:
    """This node's address for collectives: VLLM_HOST_IP, else the first non-loopback
    interface's IPv4 address, else (a network namespace with only ``lo``) 127.0.0.1."""
    if env.VLLM_HOST_IP:
        return env.VLLM_HOST_IP
    for address in _interfaces().values():
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return LOOPBACK


def find_free_port(host: str, first: int | None) -> int:
    """A port free on ``host``: the first free one from ``first`` upward (VLLM_PORT), or
    one the system picks when ``first`` is None."""
    candidates = [0] if first is None else range(first, min(first + PORT_SCAN, 65536))
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DistributedError(
        f"no free port on {host} in {first}..{first + PORT_SCAN - 1} (VLLM_PORT={first}); "  # type: ignore[operator]
        "set VLLM_PORT to a free range"
    )


def rendezvous_address(env: EnvSnapshot) -> tuple[str, int]:
    """(host, port) where the ranks of one machine meet: VLLM_HOST_IP (unset:
    127.0.0.1) and the first free port from VLLM_PORT (unset: a free port)."""
    host = env.VLLM_HOST_IP or LOOPBACK
    return host, find_free_port(host, env.VLLM_PORT)


def init_method(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def _parse_init_method(method: str) -> tuple[str, int]:
    if not method.startswith("tcp://"):
        raise DistributedError(f"init_method={method!r} is not valid; accepted: tcp://HOST:PORT")
    host, _, port = method.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"init_method={method!r} is not valid; accepted: tcp://HOST:PORT")
    return host, int(port)


@dataclass
class ProcessGroups:
    """This rank's place in the world and its groups."""

    parallel: ParallelConfig
    rank: int
    tp_group: dist.ProcessGroup  # the ranks of this pipeline stage
    tp_ranks: tuple[int, ...]  # their global ranks, tp_rank order

    @property
    def pp_rank(self) -> int:
        return self.parallel.coordinates(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.parallel.coordinates(self.rank)[1]

    def close(self) -> None:
        """Destroy every group this process joined (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _gloo_interface(env: Mapping[str, str], host: str) -> None:
    """Tell gloo which interface to use unless the user did (GLOO_SOCKET_IFNAME)."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return
    name = "lo" if ipaddress.ip_address(host).is_loopback else interface_holding(host)
    if name is not None:
        # gloo reads it from the process environment when it creates its device
        os.environ["GLOO_SOCKET_IFNAME"] = name


def init_process_groups(
    parallel: ParallelConfig,
    rank: int,
    method: str,
    backend: str,
    timeout_s: float,
    env: Mapping[str, str],
) -> ProcessGroups:
    """Join the world at ``method`` within ``timeout_s`` and build the tensor-parallel
    groups (every rank creates every group, in the same order, as torch requires).

    A rendezvous that does not answer raises :class:`DistributedError` naming the rank,
    the address and the port.
    """
    host, port = _parse_init_method(method)
    if backend == "gloo":
        _gloo_interface(env, host)
    timeout = datetime.timedelta(seconds=timeout_s)
    world = parallel.world_size
    try:
        store = dist.TCPStore(  # type: ignore[attr-defined]
            host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=True
        )
    except (RuntimeError, OSError) as exc:  # DistNetworkError/DistStoreError are RuntimeErrors
        what = (
            f"rank 0 could not hold the rendezvous at {host}:{port} (serve it and see "
            f"all {world} ranks join)"
            if rank == 0
            else f"rank {rank} could not reach the rendezvous at {host}:{port}"
        )
        raise DistributedError(
            f"{what} within {timeout_s:g} s: {str(exc).splitlines()[0]}; check "
            "VLLM_HOST_IP/VLLM_PORT and that every rank was started"
        ) from exc
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank}: the {backend} process group at {host}:{port} did not form: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    tp = parallel.tensor_parallel_size
    mine: dist.ProcessGroup | None = None
    my_ranks: tuple[int, ...] = ()
    for stage in range(parallel.pipeline_parallel_size):
        ranks = tuple(parallel.rank_of(stage, t) for t in range(tp))
        group = dist.new_group(list(ranks), timeout=timeout, backend=backend)
        if rank in ranks:
            mine, my_ranks = group, ranks
    assert mine is not None
    logger.info(
        "rank %d of %d joined at %s:%d over %s (tp group %s)", rank, world, host, port, backend,
        list(my_ranks),
    )  # fmt: skip
    return ProcessGroups(parallel, rank, mine, my_ranks)


def close_quietly(groups: ProcessGroups | None) -> None:
    """Destroy the process groups, ignoring a backend that already failed."""
    with contextlib.suppress(RuntimeError, ValueError):
        if groups is not None:
            groups.close()
        elif dist.is_initialized():
            dist.destroy_process_group()
