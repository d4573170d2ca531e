"""The driver rank's step results in shared memory: tensors that skip the reply pipe.

The executor creates one anonymous shared-memory file (``memfd_create``: it has no name,
so nothing ever appears in /dev/shm and the kernel frees it with its last mapping, even
after kill -9 of every process) of ``max_num_seqs x vocab x 4`` bytes, room for the
largest step's float32 logits, and hands its descriptor to the driver rank only. Each
step the driver copies its logits (and the prompt logits that still fit) into the area,
from offset 0, and replies a small typed header naming where each tensor lies
(:class:`~kvrun.executor.messages.SharedTensor`); a tensor that does not fit travels in
the header as bytes, as before. The executor reads the tensors as views of its own
mapping: no pickling, no copy through the pipe.

Invariants:
- the area is split into equal slots, one per batch the executor keeps in flight (its
  pipeline parallel size; one slot without pipeline parallelism): step N's tensors go
  into slot N mod slots, so a step's views stay valid while the following steps are
  written, until the same slot comes round again;
- one writer (the driver rank) and one reader (the executor), alternating: the driver
  writes step N's tensors only after the executor published step N, which it does only
  after the caller of step N-1 returned; the reply's arrival on the pipe orders the
  writes before the reads. So the views a step returns are valid until the next
  :meth:`~kvrun.executor.mp.MultiprocExecutor.execute`, which the engine's step loop
  honours (it samples from a step's logits before it asks for the next). A caller that
  keeps a step's tensors longer must copy them; pooling's hidden states, which the
  engine keeps across steps, never travel here.
- every tensor starts at a multiple of :data:`ALIGN` bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import torch

from kvrun.executor.messages import (
    AttachedTensor,
    MessageError,
    SharedTensor,
    TensorBlob,
    dtype_named,
    pack_tensor,
)

__all__ = ["ALIGN", "ResultArea", "ResultAreaWriter"]

ALIGN = 64  # bytes: each tensor's offset in the area


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class ResultArea:
    """The executor's side: creates the area and reads tensors from it."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 1:
            raise ValueError(f"a result area needs at least 1 byte, got {nbytes}")
        self.nbytes = _align(nbytes)
        self.fd = os.memfd_create("kvrun_mp_result", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.nbytes)  # pages are allocated as they are first written
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.nbytes)
        except BaseException:
            os.close(self.fd)
            raise
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def tensor(self, ref: SharedTensor | AttachedTensor) -> torch.Tensor:
        """A view of the tensor the driver placed at ``ref`` (valid until the next step)."""
        if not isinstance(ref, SharedTensor):
            raise MessageError(f"the mp executor's driver rank sent a {type(ref).__name__}")
        dtype = dtype_named(ref.dtype)
        count = 1
        for d in ref.shape:
            count *= d
        size = count * dtype.itemsize  # no tensor made per step
        if ref.offset % ALIGN or ref.offset < 0 or ref.offset + size > self.nbytes:
            raise ValueError(
                f"a {ref.dtype} tensor of shape {ref.shape} at offset {ref.offset} does not lie "
                f"in the {self.nbytes}-byte result area at a multiple of {ALIGN}"
            )
        return self._bytes[ref.offset : ref.offset + size].view(dtype).view(ref.shape)

    def close_fd(self) -> None:
        """Close the descriptor once the driver holds its own copy (the mapping stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Release the descriptor and the mapping; idempotent. Views still held elsewhere
        keep the mapping alive until they are collected (the memory is freed then)."""
        self.close_fd()
        mapping, self._map = self._map, None
        if mapping is None:
            return
        del self._bytes
        with contextlib.suppress(BufferError):  # a caller still holds a view
            mapping.close()


class ResultAreaWriter:
    """The driver rank's side: maps the area from its descriptor and places tensors."""

    def __init__(self, fd: int) -> None:
        self.nbytes = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, self.nbytes)
        os.close(fd)  # the mapping keeps the memory
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._next = 0
        self._end = self.nbytes

    def start_step(self, slot: int = 0, num_slots: int = 1) -> None:
        """Place this step's tensors in ``slot`` of ``num_slots`` equal slots (whose last
        tensors the executor has read)."""
        slot_bytes = self.nbytes // num_slots // ALIGN * ALIGN
        self._next = slot * slot_bytes
        self._end = self._next + slot_bytes

    def place(self, tensor: torch.Tensor) -> SharedTensor | TensorBlob:
        """Copy ``tensor`` into the area when it fits (a SharedTensor naming where), else
        its bytes for the reply itself."""
        blob_dtype = str(tensor.dtype).removeprefix("torch.")
        size = tensor.numel() * tensor.element_size()
        if self._next + size > self._end or tensor.numel() == 0:
            return pack_tensor(tensor)
        dtype_named(blob_dtype)  # a dtype that may cross, else MessageError
        offset = self._next
        view = self._bytes[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        self._next = _align(offset + size)
        return SharedTensor(blob_dtype, list(tensor.shape), offset)

    def close(self) -> None:
        del self._bytes
        with contextlib.suppress(BufferError):
            self._map.close()
