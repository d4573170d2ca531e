"""A single-writer, many-reader broadcast ring over POSIX shared memory.

The writer (the executor) publishes each message once; every reader (a worker) reads
every message in order and acknowledges it. Layout of the segment (all little-endian
uint64 counters, each written by exactly one process):

    [write_seq][read_seq[0]] ... [read_seq[R-1]]      header, padded to 64 bytes
    slot 0 .. slot N-1, each slot_bytes:  [frame length u32][last-frame flag u32][payload]

Invariants:
- frame ``s`` (counting from 0) lives in slot ``s % N``; the writer fills frame ``s``
  only once every reader's ``read_seq`` exceeds ``s - N`` (its slot was read by all),
  then bumps ``write_seq`` to ``s + 1``. A reader reads frame ``s`` only once
  ``write_seq > s``, copies it out, then sets its own ``read_seq`` to ``s + 1``: that
  is its acknowledgement. Counters only grow, and each is an aligned 8-byte store
  (ctypes), which x86-64 and aarch64 make atomic; x86-64 keeps stores in order, which
  is what makes a published frame visible before its ``write_seq``.
- a message longer than one slot's payload is split into consecutive frames; the last
  carries the flag. Any size passes through any ring, at one slot at a time.
- readers sleep on a doorbell pipe of their own (one byte per published frame, drained
  on waking), so an idle worker costs no CPU; EOF on it means the writer is gone.
- while the ring is full, the writer waits for the slowest reader and logs a warning
  every ``warn_interval_s`` naming the readers that lag (VLLM_RINGBUFFER_WARNING_INTERVAL).

Readers attach by opening ``/dev/shm/<name>`` themselves, not through
multiprocessing.shared_memory: on Python < 3.13 an attaching SharedMemory registers
the segment with the reader's resource tracker, which would unlink it when the reader
exits. The writer's SharedMemory is registered (its tracker unlinks the segment if the
writer's process is killed) and :meth:`BroadcastWriter.close` unlinks it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import secrets
import select
import struct
import time
from collections.abc import Callable, Sequence
from multiprocessing import shared_memory

from kvrun.executor.messages import ChannelHandle

__all__ = [
    "SEGMENT_PREFIX",
    "BroadcastReader",
    "BroadcastWriter",
    "ChannelClosed",
    "ChannelTimeout",
]

logger = logging.getLogger(__name__)

# Every segment kvrun's executor creates is /dev/shm/kvrun_mp_<pid>_<random>.
SEGMENT_PREFIX = "kvrun_mp_"
_HEADER_ALIGN = 64
_FRAME = struct.Struct("<II")  # payload length, last-frame flag


class ChannelClosed(RuntimeError):
    """The other side of the channel is gone (the writer exited)."""


class ChannelTimeout(TimeoutError):
    """A bounded wait on the channel ran out."""


def _header_bytes(num_readers: int) -> int:
    raw = 8 * (1 + num_readers)
    return -(-raw // _HEADER_ALIGN) * _HEADER_ALIGN


def _counters(buf: memoryview | mmap.mmap, num_readers: int) -> list[ctypes.c_uint64]:
    return [ctypes.c_uint64.from_buffer(buf, 8 * i) for i in range(1 + num_readers)]


class BroadcastWriter:
    """The writing end; create it before starting the readers, hand each its handle,
    its reader index and the read end of its doorbell (:meth:`doorbell_read_fd`)."""

    def __init__(
        self,
        num_readers: int,
        *,
        num_slots: int = 16,
        slot_bytes: int = 1 << 20,
        warn_interval_s: float = 60.0,
        reader_names: Sequence[str] | None = None,
    ) -> None:
        if num_readers < 1 or num_slots < 1 or slot_bytes <= _FRAME.size:
            raise ValueError(
                f"a ring needs >= 1 reader, >= 1 slot and slots over {_FRAME.size} bytes; got "
                f"{num_readers} readers, {num_slots} slots of {slot_bytes} bytes"
            )
        self.num_readers = num_readers
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.warn_interval_s = warn_interval_s
        self.reader_names = list(reader_names or (f"reader {i}" for i in range(num_readers)))
        self._header = _header_bytes(num_readers)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self._shm = shared_memory.SharedMemory(
            name=name, create=True, size=self._header + num_slots * slot_bytes
        )
        self.name = self._shm.name
        assert self._shm.buf is not None
        self._buf: memoryview = self._shm.buf
        self._counters = _counters(self._buf, num_readers)
        for counter in self._counters:
            counter.value = 0
        self._doorbells = [os.pipe() for _ in range(num_readers)]
        for _, write_fd in self._doorbells:
            os.set_blocking(write_fd, False)
        self._closed = False

    @property
    def handle(self) -> ChannelHandle:
        return ChannelHandle(self.name, self.num_readers, self.num_slots, self.slot_bytes)

    def doorbell_read_fd(self, reader: int) -> int:
        return self._doorbells[reader][0]

    def inherited_fds(self, reader: int) -> list[int]:
        """The doorbell descriptors a forked reader ``reader`` must close: every write end
        (else the writer's exit never reads as EOF) and the other readers' read ends."""
        fds = [w for _, w in self._doorbells]
        fds += [r for i, (r, _) in enumerate(self._doorbells) if i != reader and r >= 0]
        return fds

    def close_reader_fds(self) -> None:
        """Close this process's copies of the doorbells' read ends (once readers hold them),
        so that a reader's death is not masked and the writer's exit reads as EOF."""
        for i, (read_fd, write_fd) in enumerate(self._doorbells):
            if read_fd >= 0:
                os.close(read_fd)
                self._doorbells[i] = (-1, write_fd)

    def lagging(self) -> list[str]:
        """Readers that have not acknowledged every published frame."""
        write_seq = self._counters[0].value
        return [
            self.reader_names[i]
            for i in range(self.num_readers)
            if self._counters[1 + i].value < write_seq
        ]

    def publish(
        self,
        payload: bytes,
        *,
        check: Callable[[], None] = lambda: None,
        timeout_s: float | None = None,
    ) -> None:
        """Broadcast one message to every reader. While the ring is full, ``check`` is
        called now and then (it raises to abandon the wait, e.g. when a reader's process
        died); ChannelTimeout after ``timeout_s`` seconds (None: no bound)."""
        capacity = self.slot_bytes - _FRAME.size
        frames = max(1, -(-len(payload) // capacity))
        view = memoryview(payload)
        for f in range(frames):
            part = view[f * capacity : (f + 1) * capacity]
            self._write_frame(part, last=f == frames - 1, check=check, timeout_s=timeout_s)

    def _write_frame(
        self, part: memoryview, *, last: bool, check: Callable[[], None], timeout_s: float | None
    ) -> None:
        seq = self._counters[0].value
        self._wait_for_room(seq, check, timeout_s)
        offset = self._header + (seq % self.num_slots) * self.slot_bytes
        _FRAME.pack_into(self._buf, offset, len(part), int(last))
        start = offset + _FRAME.size
        self._buf[start : start + len(part)] = part
        self._counters[0].value = seq + 1  # publish: the frame is complete before this store
        for _, write_fd in self._doorbells:
            try:
                os.write(write_fd, b"\x01")
            except BlockingIOError:
                pass  # the pipe is full of unread rings: the reader will wake anyway
            except BrokenPipeError:
                pass  # the reader is gone; the executor notices through its process

    def _wait_for_room(self, seq: int, check: Callable[[], None], timeout_s: float | None) -> None:
        started = last_warned = time.monotonic()
        delay = 20e-6
        while True:
            oldest = min(c.value for c in self._counters[1:])
            if seq - oldest < self.num_slots:
                return
            check()
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                raise ChannelTimeout(
                    f"the shared-memory ring {self.name} stayed full for {timeout_s:.1f} s: "
                    f"{', '.join(self.lagging())} did not read"
                )
            if now - last_warned >= self.warn_interval_s:
                last_warned = now
                logger.warning(
                    "the shared-memory ring buffer is full: %s has not read for %.1f s "
                    "(warning every VLLM_RINGBUFFER_WARNING_INTERVAL=%g s)",
                    ", ".join(self.lagging()),
                    now - started,
                    self.warn_interval_s,
                )
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def close(self) -> None:
        """Close the doorbells (readers see EOF) and unlink the segment; idempotent."""
        if self._closed:
            return
        self._closed = True
        for read_fd, write_fd in self._doorbells:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
        del self._counters
        self._buf.release()
        self._shm.close()
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()


class BroadcastReader:
    """One reader's end: attaches to the segment a :class:`ChannelHandle` names."""

    def __init__(self, handle: ChannelHandle, reader: int, doorbell_fd: int) -> None:
        if not 0 <= reader < handle.num_readers:
            raise ValueError(f"reader {reader} is not in 0..{handle.num_readers - 1}")
        self.handle = handle
        self.reader = reader
        self._doorbell = doorbell_fd
        os.set_blocking(doorbell_fd, False)
        self._header = _header_bytes(handle.num_readers)
        fd = os.open(f"/dev/shm/{handle.name}", os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, self._header + handle.num_slots * handle.slot_bytes)
        finally:
            os.close(fd)
        self._counters = _counters(self._map, handle.num_readers)
        self._mine = self._counters[1 + reader]

    def receive(self, timeout_s: float | None = None) -> bytes:
        """The next message, waiting for it; ChannelTimeout after ``timeout_s``,
        ChannelClosed when the writer is gone."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        parts: list[bytes] = []
        while True:
            seq = self._mine.value
            self._wait_published(seq, deadline)
            offset = self._header + (seq % self.handle.num_slots) * self.handle.slot_bytes
            length, last = _FRAME.unpack_from(self._map, offset)
            start = offset + _FRAME.size
            parts.append(self._map[start : start + length])
            self._mine.value = seq + 1  # acknowledge: the slot may be reused
            if last:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wait_published(self, seq: int, deadline: float | None) -> None:
        while True:
            self._drain_doorbell()
            if self._counters[0].value > seq:
                return
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                raise ChannelTimeout(f"no message on {self.handle.name} in time")
            with contextlib.suppress(InterruptedError):
                select.select([self._doorbell], [], [], min(wait, 1.0))

    def _drain_doorbell(self) -> None:
        while True:
            try:
                data = os.read(self._doorbell, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                if self._counters[0].value > self._mine.value:
                    return  # read what the writer left before it went
                raise ChannelClosed(f"the writer of {self.handle.name} is gone")

    def close(self) -> None:
        del self._counters, self._mine
        self._map.close()
