"""How the frontend reaches the engine loop: a thread, or a process behind ZeroMQ.

Both carry the typed messages of :mod:`kvrun.server.wire`. The process transport
encodes them as msgpack; the thread transport hands the Structs over directly
(the engine builds fresh ones for every message, so nothing is shared mutably).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import threading
from abc import ABC, abstractmethod
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from kvrun.server.ipc import IpcPaths, bind_private, make_ipc_paths, remove_ipc_paths
from kvrun.server.wire import EngineMessage, FrontendMessage, Hello, engine_decoder

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot

__all__ = ["ProcessTransport", "ThreadTransport", "Transport"]

logger = logging.getLogger(__name__)


class Transport(ABC):
    """Invariants: ``receive`` returns at least one message; ``exit_reason`` is None
    while the engine side runs; ``close`` leaves no thread, process or socket file."""

    @abstractmethod
    async def start(self) -> None:
        """Start the engine side (it loads the model in the background)."""

    @abstractmethod
    def send(self, msg: FrontendMessage) -> None: ...

    @abstractmethod
    async def receive(self) -> list[EngineMessage]:
        """Wait for the next messages from the engine."""

    @abstractmethod
    def pending(self) -> bool:
        """Whether messages are waiting to be received (a busy event loop, not a hung engine)."""

    @abstractmethod
    def exit_reason(self) -> str | None:
        """Why the engine side is gone, or None while it runs."""

    @abstractmethod
    def kill(self) -> None:
        """Stop a hung engine side now."""

    @abstractmethod
    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the engine side to stop (after Shutdown), then force it."""

    def engine_index(self, request_id: str) -> int:
        """The engine (data-parallel rank) a request was sent to; 0 with one engine."""
        return 0


class ThreadTransport(Transport):
    """The engine loop in a daemon thread of this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""

    def __init__(self, engine_args: EngineArgs, env: EnvSnapshot) -> None:
        self._args = engine_args
        self._env = env
        self._inbox: queue.Queue[FrontendMessage] = queue.Queue()
        self._outbox: asyncio.Queue[EngineMessage] = asyncio.Queue()
        self._stop = threading.Event()
        self._exited = asyncio.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        from kvrun.server.engine_core import run_engine

        loop = asyncio.get_running_loop()

        def send(msg: EngineMessage) -> None:
            loop.call_soon_threadsafe(self._outbox.put_nowait, msg)

        def receive(timeout: float) -> list[FrontendMessage]:
            messages: list[FrontendMessage] = []
            try:
                messages.append(
                    self._inbox.get(timeout=timeout) if timeout else self._inbox.get_nowait()
                )
                while True:
                    messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

        def target() -> None:
            try:
                send(Hello(os.getpid()))
                run_engine(self._args, self._env, send, receive, self._stop.is_set)
            finally:
                # Through the loop, after the thread's last message: a Dead message is
                # queued before the exit is seen, so its reason is not lost to the exit.
                loop.call_soon_threadsafe(self._exited.set)

        self._thread = threading.Thread(target=target, name="kvrun-engine", daemon=True)
        self._thread.start()

    def send(self, msg: FrontendMessage) -> None:
        self._inbox.put(msg)

    async def receive(self) -> list[EngineMessage]:
        messages = [await self._outbox.get()]
        while not self._outbox.empty():
            messages.append(self._outbox.get_nowait())
        return messages

    def pending(self) -> bool:
        return not self._outbox.empty()

    def exit_reason(self) -> str | None:
        if self._exited.is_set() and not self._stop.is_set():
            return "the engine thread exited"
        return None

    def kill(self) -> None:
        # A thread cannot be killed; it is a daemon and stops with the process.
        self._stop.set()

    async def close(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)


class ProcessTransport(Transport):
    """The engine loop in a spawned process, over two ipc:// sockets."""

    def __init__(
        self,
        engine_args: EngineArgs,
        env: EnvSnapshot,
        *,
        rank: int | None = None,  # a data-parallel rank (kvrun.server.data_parallel)
        cpus: tuple[int, ...] | None = None,  # pin the engine process to these CPUs
    ) -> None:
        self._args = engine_args
        self._env = env
        self._rank = rank
        self._cpus = cpus
        self._released = False
        self.paths: IpcPaths = make_ipc_paths(env.VLLM_RPC_BASE_PATH)
        self._ctx = zmq.asyncio.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        bind_private(self._pull, self.paths.frontend_input)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(IpcPaths.address(self.paths.engine_input))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = engine_decoder()
        self.process: BaseProcess | None = None
        self._closed = False
        self.dropped = 0  # messages dropped as undecodable
        # The socket's only reader (a task, started by the first receive) moves every
        # message here as it arrives; `pending` looks here and never at the socket: asking
        # a zmq.asyncio socket for ZMQ_EVENTS while a task awaits it can consume the edge
        # that task waits for, and its messages then stall (seen with DP under load).
        self._inbox: asyncio.Queue[EngineMessage | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: BaseException | None = None

    async def start(self) -> None:
        from kvrun.server.engine_core import engine_process_main

        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=engine_process_main,
            args=(self._args, self._env, self.paths, os.getpid(), self._cpus),
            name="kvrun-engine" if self._rank is None else f"kvrun-engine-dp{self._rank}",
            daemon=True,
        )
        self.process.start()
        logger.info(
            "%sengine process %d started; sockets in %s",
            "" if self._rank is None else f"DP rank {self._rank}: ",
            self.process.pid,
            self.paths.directory,
        )

    def send(self, msg: FrontendMessage) -> None:
        # PUSH never blocks here: zmq queues until the engine reads (default HWM 1000
        # messages, far above what one event-loop turn sends).
        self._push.send(self._encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)

    def _decode(self, frames: list[bytes]) -> EngineMessage | None:
        if len(frames) != 1:
            self.dropped += 1
            logger.warning("dropped a %d-part message on the frontend socket", len(frames))
            return None
        try:
            return self._decoder.decode(frames[0])
        except msgspec.DecodeError as exc:
            self.dropped += 1
            logger.warning(
                "dropped %d bytes on the frontend socket that are not a kvrun message: %s",
                len(frames[0]),
                exc,
            )
            return None

    async def receive(self) -> list[EngineMessage]:
        if self._inbox is None:
            self._inbox = asyncio.Queue()
            self._reader = asyncio.get_running_loop().create_task(
                self._read_socket(self._inbox), name="kvrun-engine-socket-reader"
            )
        messages: list[EngineMessage] = []
        msg = await self._inbox.get()
        while msg is not None:
            messages.append(msg)
            if self._inbox.empty():
                return messages
            msg = self._inbox.get_nowait()
        self._inbox.put_nowait(None)  # the reader failed: say so on this and every call
        if messages:
            return messages
        raise RuntimeError(
            f"reading the engine's socket failed: {self._reader_error!r}"
        ) from self._reader_error

    async def _read_socket(self, inbox: asyncio.Queue[EngineMessage | None]) -> None:
        """The socket's only reader: every message into ``inbox`` as it arrives; on an
        error, None (after which receive raises it)."""
        try:
            while True:
                msg = self._decode(await self._pull.recv_multipart())
                if msg is not None:
                    inbox.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._reader_error = exc
            inbox.put_nowait(None)

    def pending(self) -> bool:
        return self._inbox is not None and not self._inbox.empty()

    def exit_reason(self) -> str | None:
        if self.process is None or self.process.exitcode is None:
            return None
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return f"the engine process (pid {self.process.pid}) {how}"

    def kill(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            self.process.kill()

    async def close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        process = self.process
        if process is not None:
            await asyncio.to_thread(process.join, timeout)
            if process.exitcode is None:
                logger.warning(
                    "engine process %d did not stop in %.1fs; killing it", process.pid, timeout
                )
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
        self.release()

    def release(self) -> None:
        """Close the sockets and remove their files (once; the process must be gone)."""
        if self._released:
            return
        self._released = True
        if self._reader is not None and not self._reader.done():
            with contextlib.suppress(RuntimeError):  # its event loop already closed
                self._reader.cancel()
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
        remove_ipc_paths(self.paths)
