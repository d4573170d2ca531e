"""The Ray executor's node-local data path: the ranks on the engine's node get their steps
and give back their logits through shared memory, not through Ray.

Ray places and supervises the rank actors (:mod:`kvrun.executor.ray_executor`); a Ray
actor call costs milliseconds on a small machine (the call and its reply go through
Ray's worker and its RPC threads, a reply over 100 KB through the object store), which
is most of a decode step of a small model. So for the ranks on the engine's own node
(the same Ray node) the executor uses the mp executor's transport instead:

- the step broadcast: the mp executor's shared-memory ring
  (:class:`~kvrun.executor.shm_channel.BroadcastWriter`, /dev/shm/kvrun_mp_*), one
  reader per local rank, the same typed messages (ExecuteStep, CommitKVCache, Shutdown);
- the driver rank's logits: the mp executor's result area
  (:class:`~kvrun.executor.result_area.ResultArea`, an anonymous memfd), one slot per
  batch in flight (step N in slot N mod slots: the pipeline parallel size), with a
  small typed header (StepResult, Committed, WorkerFailed) on the rank's connection;
- the connection: a Unix socket the engine listens on in a private directory (mode
  0700) until every local rank has connected; each rank proves it was sent (a random
  token), and the engine hands it its doorbell's read end and, to the driver rank, the
  result area's descriptor (SCM_RIGHTS: actors are not the engine's children, so they
  cannot inherit them). The listening socket and its directory are removed as soon as
  the ranks are connected; the connection then carries the rank's replies, and its
  end-of-file is how the engine learns at once that the rank's process died.

A local rank's actor then runs one long call, :meth:`LocalEnd.serve`, that reads the
ring until Shutdown or the engine's exit (the doorbell's EOF); Ray still supervises it
(a killed actor fails that call). Ranks on other nodes keep receiving each step as an
actor call. Under a Ray compiled graph the steps go through the graph, and the driver
rank (when on the engine's node) puts its logits in the result area and sends the
StepResult header on its connection (:attr:`LocalAttach.ring` is None): the engine
sleeps on the connection instead of in Ray's channel read, which busy-waits (measured:
~8 ms of the engine's CPU per decode step on 2 cores), and reads the graph's (empty)
outputs once the header is there.

Nothing here is pickled: the offer the engine sends through Ray is a msgspec message.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from kvrun.errors import KvrunError
from kvrun.executor.messages import (
    ChannelHandle,
    CommitKVCache,
    Committed,
    ExecuteStep,
    MessageError,
    Shutdown,
    StepResult,
    TensorRef,
    WorkerFailed,
    decode_broadcast,
    encode,
    pack_step_logits,
    pack_tensor,
)
from kvrun.executor.result_area import ALIGN, ResultArea, ResultAreaWriter
from kvrun.executor.shm_channel import BroadcastReader, BroadcastWriter, ChannelClosed

__all__ = ["LocalAttach", "LocalEnd", "LocalRanks"]

_LENGTH = struct.Struct("<I")
_MAX_HELLO = 1 << 12


class LocalAttach(msgspec.Struct, forbid_unknown_fields=True):
    """What the engine tells a local rank's actor: where to connect and what it gets."""

    path: str  # the engine's Unix socket
    token: str  # proves the connection comes from a rank the engine asked
    rank: int
    ring: ChannelHandle | None  # the step ring (None: steps come another way)
    reader: int  # this rank's reader index in the ring
    result_area: bool  # the engine sends the result area's descriptor too (driver rank)
    result_slots: int = 1  # the area's slots: step N's tensors go in slot N mod result_slots


class _Hello(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    rank: int


def decode_attach(payload: bytes) -> LocalAttach:
    try:
        attach = msgspec.msgpack.decode(payload, type=LocalAttach)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"{len(payload)} bytes are not a LocalAttach message ({exc})") from None
    if attach.result_slots < 1:
        raise MessageError(
            f"LocalAttach.result_slots={attach.result_slots}: at least 1 is accepted"
        )
    return attach


class LocalRanks:
    """The engine's end: the ring (when ``ring``), the result area (when the driver rank
    is local and ``result_bytes`` > 0: ``result_slots`` slots of ``result_bytes``, one
    per step in flight) and one connection per local rank.

    ``ranks`` are the global ranks on the engine's node; ring reader i is ranks[i].
    Create it, send each rank :meth:`offer` (the actor's ``attach_local``), then
    :meth:`accept`. :meth:`close` releases everything (idempotent)."""

    def __init__(
        self,
        ranks: Sequence[int],
        driver_rank: int,
        *,
        ring: bool,
        result_bytes: int,
        result_slots: int = 1,
        ring_warning_interval_s: float = 60.0,
    ) -> None:
        if result_slots < 1:
            raise ValueError(f"result_slots={result_slots}: at least 1 is accepted")
        self.ranks = list(ranks)
        self.result_slots = result_slots
        self.driver_rank = driver_rank
        self.token = secrets.token_hex(16)
        self.conns: dict[int, Connection] = {}
        self.writer: BroadcastWriter | None = None
        self.area: ResultArea | None = None
        self._listener: socket.socket | None = None
        self._dir: str | None = None
        self.closed = False
        try:
            if ring:
                self.writer = BroadcastWriter(
                    len(self.ranks),
                    warn_interval_s=ring_warning_interval_s,
                    reader_names=[f"worker rank {r}" for r in self.ranks],
                )
            if driver_rank in self.ranks and result_bytes > 0:
                slot_bytes = -(-result_bytes // ALIGN) * ALIGN
                self.area = ResultArea(slot_bytes * result_slots)
            self._dir = tempfile.mkdtemp(prefix="kvrun_ray_")  # mode 0700: ours alone
            self.path = os.path.join(self._dir, "s")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener = listener
            listener.bind(self.path)
            listener.listen(max(1, len(self.ranks)))
        except BaseException:
            self.close()
            raise

    @property
    def segment_name(self) -> str | None:
        """The ring's /dev/shm segment (None without a ring)."""
        return self.writer.name if self.writer is not None else None

    def offer(self, rank: int) -> bytes:
        """The encoded :class:`LocalAttach` for ``rank``'s actor."""
        reader = self.ranks.index(rank)
        return msgspec.msgpack.encode(
            LocalAttach(
                path=self.path,
                token=self.token,
                rank=rank,
                ring=self.writer.handle if self.writer is not None else None,
                reader=reader,
                result_area=self.area is not None and rank == self.driver_rank,
                result_slots=self.result_slots,
            )
        )

    def accept(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
        """Take every local rank's connection and hand it its descriptors. ``check`` is
        called now and then while waiting (it raises to give up, e.g. when an actor's
        attach call failed); TimeoutError after ``timeout_s``."""
        assert self._listener is not None
        deadline = time.monotonic() + timeout_s
        self._listener.settimeout(0.2)
        while len(self.conns) < len(self.ranks):
            if time.monotonic() > deadline:
                missing = sorted(set(self.ranks) - set(self.conns))
                raise TimeoutError(
                    f"rank(s) {', '.join(map(str, missing))} did not connect to {self.path} "
                    f"in {timeout_s:g} s"
                )
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                check()
                continue
            try:
                self._greet(sock, deadline)
            except BaseException:
                sock.close()
                raise
        # the ranks hold their own descriptors now: the engine's copies would only mask
        # a rank's death (doorbells) and keep memory alive (the area)
        if self.writer is not None:
            self.writer.close_reader_fds()
        if self.area is not None:
            self.area.close_fd()
        self._close_listener()

    def _greet(self, sock: socket.socket, deadline: float) -> None:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        if length > _MAX_HELLO:
            raise MessageError(f"a {length}-byte hello on {self.path}")
        try:
            hello = msgspec.msgpack.decode(_recv_exact(sock, length), type=_Hello)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MessageError(f"a malformed hello on {self.path} ({exc})") from None
        if hello.token != self.token or hello.rank not in self.ranks or hello.rank in self.conns:
            raise MessageError(f"an unexpected connection on {self.path} (rank {hello.rank})")
        fds = []
        if self.writer is not None:
            fds.append(self.writer.doorbell_read_fd(self.ranks.index(hello.rank)))
        if self.area is not None and hello.rank == self.driver_rank:
            fds.append(self.area.fd)
        socket.send_fds(sock, [b"k"], fds)
        sock.settimeout(None)
        self.conns[hello.rank] = Connection(sock.detach(), writable=False)

    def publish(self, payload: bytes, check: Callable[[], None]) -> None:
        """Broadcast one encoded message to every local rank (``check``: see
        :meth:`~kvrun.executor.shm_channel.BroadcastWriter.publish`)."""
        assert self.writer is not None
        self.writer.publish(payload, check=check)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        """Close the connections (a local rank sees EOF), unlink the ring, release the
        area and the socket's directory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._close_listener()
        for conn in self.conns.values():
            conn.close()
        self.conns = {}
        if self.writer is not None:
            self.writer.close()
        if self.area is not None:
            self.area.close()


class LocalEnd:
    """A local rank's end, in its actor: connects to the engine, maps the ring and the
    result area, and serves the ring's messages (:meth:`serve`)."""

    def __init__(self, offer: bytes, timeout_s: float = 60.0) -> None:
        attach = decode_attach(offer)
        self.rank = attach.rank
        self.reader: BroadcastReader | None = None
        self.area: ResultAreaWriter | None = None
        self.result_slots = attach.result_slots
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(attach.path)
            hello = msgspec.msgpack.encode(_Hello(attach.token, attach.rank))
            sock.sendall(_LENGTH.pack(len(hello)) + hello)
            wanted = int(attach.ring is not None) + int(attach.result_area)
            _, fds, _, _ = socket.recv_fds(sock, 16, max(1, wanted))
            if len(fds) != wanted:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError(
                    f"rank {attach.rank} got {len(fds)} descriptor(s) from the engine at "
                    f"{attach.path}, expected {wanted}"
                )
            if attach.ring is not None:
                self.reader = BroadcastReader(attach.ring, attach.reader, fds.pop(0))
            if attach.result_area:
                self.area = ResultAreaWriter(fds.pop(0))
            sock.settimeout(None)
            self.reply = Connection(sock.detach(), readable=False)
        except BaseException:
            sock.close()
            self.close()
            raise

    def place(self, tensor: Any) -> TensorRef:
        """Where a result tensor travels: the result area when there is one."""
        return self.area.place(tensor) if self.area is not None else pack_tensor(tensor)

    def step_result(self, step: int, out: Any) -> StepResult:
        """The driver rank's StepResult of ``out``, its tensors in the area."""
        if self.area is not None:  # the engine has read this slot's last step
            self.area.start_step(step % self.result_slots, self.result_slots)
        return StepResult(step, pack_step_logits(out, self.place))

    def serve(self, worker: Any, is_driver: bool) -> None:
        """Run the ring's messages in order until Shutdown or the engine's exit; a
        failure is reported on the connection (WorkerFailed) and raised."""
        assert self.reader is not None
        phase = "waiting for the executor"
        try:
            while True:
                phase = "waiting for the executor"
                try:
                    message = decode_broadcast(self.reader.receive())
                except ChannelClosed:
                    return  # the engine is gone
                if isinstance(message, ExecuteStep):
                    phase = "execute"
                    out = worker.execute_step(message)
                    if is_driver:
                        if out is None:
                            raise RuntimeError(
                                "the driver rank's Worker.execute returned no logits"
                            )
                        self.reply.send_bytes(encode(self.step_result(message.step, out)))
                elif isinstance(message, CommitKVCache):
                    phase = "commit_kv_cache"
                    committed = Committed(self.rank, int(worker.commit_kv_cache()))
                    self.reply.send_bytes(encode(committed))
                elif isinstance(message, Shutdown):
                    return
                else:
                    raise MessageError(
                        f"rank {self.rank} got {type(message).__name__} on the ring; accepted: "
                        "ExecuteStep, CommitKVCache, Shutdown"
                    )
        except BaseException as exc:
            self.report_failure(phase, exc)
            raise

    def report_failure(self, phase: str, exc: BaseException) -> None:
        """Tell the engine (WorkerFailed on the connection) that ``phase`` raised ``exc``."""
        failed = WorkerFailed(
            rank=self.rank,
            phase=phase,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            user_error=isinstance(exc, KvrunError),
        )
        with contextlib.suppress(OSError):  # the engine may be gone
            self.reply.send_bytes(encode(failed))

    def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.close()
        area, self.area = self.area, None
        if area is not None:
            area.close()
        reply = getattr(self, "reply", None)
        if reply is not None:
            reply.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("the connection closed during the hello")
        data += part
    return data
