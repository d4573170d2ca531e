"""`ProcessTransport.pending()` (the single-engine watchdog's "messages are waiting"):
it answers from what the socket's one reader task has taken and not yet handed over,
never by asking the zmq.asyncio socket for ZMQ_EVENTS, which can consume the edge the
reader waits on (that stalled a DP rank's messages for good under load)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from kvrun.envs import read_env
from kvrun.server.engine_core import EngineEndpoint
from kvrun.server.transport import ProcessTransport
from kvrun.server.wire import EngineMessage, Hello


def test_pending_counts_what_the_reader_took_and_receive_hands_it_all_over(
    tmp_path: Path,
) -> None:
    env = read_env({"VLLM_RPC_BASE_PATH": str(tmp_path)})

    async def scenario() -> None:
        transport = ProcessTransport(None, env)  # type: ignore[arg-type]  # never started
        endpoint = EngineEndpoint(transport.paths)
        try:
            assert not transport.pending()
            endpoint.send(Hello(1))
            assert await asyncio.wait_for(transport.receive(), 10) == [Hello(1)]
            assert not transport.pending()
            for pid in (2, 3, 4):
                endpoint.send(Hello(pid))
            deadline = time.monotonic() + 10
            while not transport.pending() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert transport.pending()
            got: list[EngineMessage] = []
            while len(got) < 3 and time.monotonic() < deadline:
                got += await asyncio.wait_for(transport.receive(), 10)
            assert got == [Hello(2), Hello(3), Hello(4)]
            assert not transport.pending()
        finally:
            endpoint.close()
            await transport.close(1.0)

    asyncio.run(scenario())


def test_a_watchdog_asking_pending_all_the_time_never_stalls_the_reader(
    tmp_path: Path,
) -> None:
    """Bursts from the engine side while a watchdog task asks pending() between every
    event-loop turn: every message arrives, in order."""
    env = read_env({"VLLM_RPC_BASE_PATH": str(tmp_path)})
    count = 3000

    async def scenario() -> None:
        transport = ProcessTransport(None, env)  # type: ignore[arg-type]  # never started
        endpoint = EngineEndpoint(transport.paths)
        stop = asyncio.Event()

        async def watchdog() -> None:
            while not stop.is_set():
                transport.pending()
                await asyncio.sleep(0)

        def engine_side() -> None:
            for pid in range(count):
                endpoint.send(Hello(pid))
                if pid % 100 == 99:
                    time.sleep(0.002)

        watching = asyncio.create_task(watchdog())
        sender = threading.Thread(target=engine_side)
        got: list[EngineMessage] = []
        try:
            sender.start()
            deadline = time.monotonic() + 60
            while len(got) < count and time.monotonic() < deadline:
                got += await asyncio.wait_for(transport.receive(), 30)
            assert [m.pid for m in got if isinstance(m, Hello)] == list(range(count))
        finally:
            stop.set()
            await watching
            sender.join(30)
            endpoint.close()
            await transport.close(1.0)

    asyncio.run(scenario())
