"""Data-parallel ranks on other machines: rank 0's master socket and the headless rank.

Rank 0 binds one ZeroMQ ROUTER socket on the master address (``tcp://IP:PORT``, that
address only). A headless rank (`kvrun serve --headless`, or VLLM_DP_RANK >= 1)
connects a DEALER socket there and registers (:class:`Register`); rank 0 answers
:class:`Welcome` or :class:`Refused` (a rank outside the remote ranks, a size that
differs, a rank already registered). The rank then loads its engine and runs the
same engine loop as a local rank, the loop's typed messages travelling over the
tcp socket as msgpack (never pickle; anything else is dropped). A rank that hears
nothing from the master within VLLM_RPC_TIMEOUT fails with an error naming its rank,
the address and the port; a rank whose master goes away stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio

from kvrun.errors import ConfigError, KvrunError
from kvrun.server.wire import (
    Abort,
    AddRequest,
    Dead,
    EngineMessage,
    FrontendMessage,
    Hello,
    Outputs,
    Ready,
    Shutdown,
    Utility,
    UtilityResult,
)

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot
    from kvrun.server.data_parallel import DataParallelConfig

__all__ = ["REGISTER_TIMEOUT_S", "Refused", "Register", "RemoteRanks", "Welcome", "run_headless"]

logger = logging.getLogger(__name__)

# How long rank 0 waits for its remote ranks to register before it gives up.
REGISTER_TIMEOUT_S = 300.0


class Register(msgspec.Struct, tag="register", forbid_unknown_fields=True):
    """A headless rank's first message."""

    rank: int
    size: int  # the data-parallel size it was started with
    pid: int


class Welcome(msgspec.Struct, tag="welcome", forbid_unknown_fields=True):
    rank: int


class Refused(msgspec.Struct, tag="refused", forbid_unknown_fields=True):
    reason: str


_ToMaster = Register | Hello | Ready | Outputs | UtilityResult | Dead
_ToRank = Welcome | Refused | AddRequest | Abort | Utility | Shutdown


def _identity(rank: int) -> bytes:
    return f"kvrun-dp-rank-{rank}".encode()


class RemoteRanks:
    """Rank 0's side: the master socket, the registered ranks, their messages."""

    def __init__(self, dp: DataParallelConfig, env: EnvSnapshot) -> None:
        self.dp = dp
        self.register_timeout_s = REGISTER_TIMEOUT_S
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 1000)
        try:
            self._router.bind(f"tcp://{dp.master}")
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            self._ctx.term()
            raise ConfigError(
                f"cannot listen for data-parallel ranks on {dp.master}: {exc}; choose another "
                "--data-parallel-rpc-port (VLLM_DP_MASTER_PORT) or --data-parallel-address "
                "(VLLM_DP_MASTER_IP, an address of this machine)"
            ) from None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(_ToMaster)  # type: ignore[arg-type]
        self._ranks: dict[bytes, int] = {}  # identity -> rank, once registered
        self._closed = False
        self.dropped = 0

    def registered(self, rank: int) -> bool:
        return _identity(rank) in self._ranks

    def _reply(self, identity: bytes, msg: Welcome | Refused) -> None:
        self._router.send_multipart([identity, self._encoder.encode(msg)], flags=zmq.NOBLOCK)

    def _register(self, identity: bytes, msg: Register) -> None:
        reason = None
        if msg.size != self.dp.size:
            reason = (
                f"DP rank {msg.rank} was started with data-parallel size {msg.size}, but rank 0 "
                f"runs {self.dp.size}; start every rank with the same --data-parallel-size "
                "(VLLM_DP_SIZE)"
            )
        elif msg.rank not in self.dp.remote_ranks:
            reason = (
                f"rank 0 expects remote ranks {self.dp.remote_ranks.start}.."
                f"{self.dp.remote_ranks.stop - 1}, not rank {msg.rank}"
            )
        elif identity != _identity(msg.rank) or identity in self._ranks:
            reason = f"DP rank {msg.rank} is already registered"
        if reason is not None:
            logger.warning("refused a DP rank: %s", reason)
            self._reply(identity, Refused(reason))
            return
        self._ranks[identity] = msg.rank
        logger.info("DP rank %d registered (pid %d)", msg.rank, msg.pid)
        self._reply(identity, Welcome(msg.rank))

    async def pump(self, queue: asyncio.Queue[tuple[int, EngineMessage]]) -> None:
        """Receive forever: registrations answered here, the ranks' messages queued."""
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                self.dropped += 1
                continue
            identity, payload = frames
            try:
                msg = self._decoder.decode(payload)
            except msgspec.DecodeError as exc:
                self.dropped += 1
                logger.warning("dropped %d bytes on the DP master socket: %s", len(payload), exc)
                continue
            if isinstance(msg, Register):
                self._register(identity, msg)
                continue
            rank = self._ranks.get(identity)
            if rank is None:
                self.dropped += 1
                continue
            queue.put_nowait((rank, msg))

    def send(self, rank: int, msg: FrontendMessage) -> None:
        identity = _identity(rank)
        if identity in self._ranks and not self._closed:
            with contextlib.suppress(zmq.ZMQError):  # gone: its silence or exit reports it
                self._router.send_multipart([identity, self._encoder.encode(msg)], zmq.NOBLOCK)

    def stop_all(self) -> None:
        for rank in list(self._ranks.values()):
            self.send(rank, Shutdown())

    def close(self) -> None:
        if self._closed:
            return
        self.stop_all()
        self._closed = True
        self._router.close(linger=1000)  # let the Shutdowns leave
        self._ctx.term()


def run_headless(engine_args: EngineArgs, env: EnvSnapshot, dp: DataParallelConfig) -> int:
    """Run rank ``dp.start_rank``'s engine core for rank 0's frontend; the exit status
    (0 after the master's Shutdown or SIGTERM). KvrunError when the master is unreachable
    or refuses the rank."""
    from kvrun.server.engine_core import run_engine

    rank = dp.start_rank
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, _identity(rank))
    sock.setsockopt(zmq.LINGER, 2000)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    encoder = msgspec.msgpack.Encoder()
    decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(_ToRank)  # type: ignore[arg-type]
    stop = {"signal": False, "master_gone": False, "dead": False, "shutdown": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sock.connect(f"tcp://{dp.master}")
        sock.send(encoder.encode(Register(rank, dp.size, os.getpid())))
        timeout_s = env.VLLM_RPC_TIMEOUT / 1000.0
        deadline = time.monotonic() + timeout_s
        reply: Any = None
        while reply is None:
            left = deadline - time.monotonic()
            if stop["signal"]:
                return 0
            if left <= 0 or not sock.poll(int(min(left, 0.25) * 1000)):
                if left <= 0:
                    raise KvrunError(
                        f"DP rank {rank} could not reach the data-parallel master at "
                        f"{dp.master} within {timeout_s:g} s (VLLM_RPC_TIMEOUT="
                        f"{env.VLLM_RPC_TIMEOUT} ms): start rank 0 (`kvrun serve` with "
                        f"--data-parallel-size {dp.size}) there first, and check "
                        "VLLM_DP_MASTER_IP/--data-parallel-address and "
                        "VLLM_DP_MASTER_PORT/--data-parallel-rpc-port"
                    )
                continue
            try:
                reply = decoder.decode(sock.recv())
            except msgspec.DecodeError:
                continue
        if isinstance(reply, Refused):
            raise ConfigError(f"the data-parallel master at {dp.master} refused: {reply.reason}")
        logger.info("DP rank %d registered with the master at %s", rank, dp.master)

        def send(msg: EngineMessage) -> None:
            if isinstance(msg, Dead):
                stop["dead"] = True
            sock.send(encoder.encode(msg))

        def receive(timeout: float) -> list[FrontendMessage]:
            messages: list[FrontendMessage] = []
            if monitor.poll(0):
                stop["master_gone"] = True
                return messages
            if not sock.poll(int(timeout * 1000)):
                return messages
            while True:
                try:
                    payload = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return messages
                try:
                    msg = decoder.decode(payload)
                except msgspec.DecodeError:
                    logger.warning("dropped %d bytes from the DP master", len(payload))
                    continue
                if isinstance(msg, Shutdown):
                    stop["shutdown"] = True
                if not isinstance(msg, Welcome | Refused):
                    messages.append(msg)

        def should_stop() -> bool:
            return stop["signal"] or stop["master_gone"]

        core_args = replace(engine_args, data_parallel_size=1)
        run_engine(core_args, env, send, receive, should_stop)
        if stop["master_gone"]:
            logger.error("DP rank %d: the master at %s went away; stopping", rank, dp.master)
            return 1
        if stop["signal"]:
            if not stop["dead"]:
                # rank 0 hears it now, not after VLLM_ENGINE_ITERATION_TIMEOUT_S of silence
                send(Dead("the headless engine core was stopped by a signal", user_error=False))
            return 0
        return 1 if stop["dead"] else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        monitor.close(linger=0)
        sock.close()
        ctx.term()
