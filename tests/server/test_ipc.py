"""The frontend <-> engine link over real ipc:// sockets: typed messages pass, anything
else is dropped, socket files are private and removed on close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import stat
from pathlib import Path

import msgspec
import pytest
import zmq

from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.scheduling import SchedulerStats
from kvrun.server.engine_core import EngineEndpoint
from kvrun.server.ipc import IpcPaths, make_ipc_paths, remove_ipc_paths
from kvrun.server.transport import ProcessTransport
from kvrun.server.wire import (
    Abort,
    AddRequest,
    Outputs,
    Utility,
    WireSampling,
)
from kvrun.stats import EngineStats

GARBAGE = [
    b"",
    b"\x00\x01\x02",
    b"not msgpack at all",
    pickle.dumps({"type": "abort", "request_ids": ["x"]}),
    pickle.dumps(os.system),  # a pickle that would run code if unpickled
    msgspec.msgpack.encode({"type": "no-such-message"}),
    msgspec.msgpack.encode({"type": "abort", "request_ids": "not-a-list"}),
    msgspec.msgpack.encode({"type": "utility", "call_id": 1, "method": "__del__"}),
]


def test_paths_are_private(tmp_path: Path) -> None:
    paths = make_ipc_paths(str(tmp_path))
    try:
        assert Path(paths.directory).parent == tmp_path
        assert stat.S_IMODE(os.stat(paths.directory).st_mode) == 0o700
        ctx = zmq.Context()
        endpoint_sock = ctx.socket(zmq.PULL)
        from kvrun.server.ipc import bind_private

        bind_private(endpoint_sock, paths.engine_input)
        assert stat.S_IMODE(os.stat(paths.engine_input).st_mode) == 0o600
        endpoint_sock.close(linger=0)
        ctx.term()
    finally:
        remove_ipc_paths(paths)
    assert not Path(paths.directory).exists()


def test_each_server_gets_its_own_directory(tmp_path: Path) -> None:
    a, b = make_ipc_paths(str(tmp_path)), make_ipc_paths(str(tmp_path))
    assert a.directory != b.directory
    remove_ipc_paths(a)
    remove_ipc_paths(b)


def test_missing_base_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        make_ipc_paths(str(missing))
    assert str(info.value) == (
        f"VLLM_RPC_BASE_PATH={str(missing)!r} is not an existing directory; point it at a "
        "writable directory for the server's ipc:// sockets"
    )


def test_base_path_too_long_for_a_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(ConfigError, match=r"is too long: socket paths under it are \d+ bytes"):
        make_ipc_paths(str(deep))
    assert list(deep.iterdir()) == []


def _stats() -> EngineStats:
    return EngineStats(SchedulerStats(1, 2, 0.5, 6, 8, 10, 4, 0), 7, 3)


def test_messages_pass_and_garbage_is_dropped_both_ways(tmp_path: Path) -> None:
    env = read_env({"VLLM_RPC_BASE_PATH": str(tmp_path)})

    async def scenario() -> None:
        transport = ProcessTransport(None, env)  # type: ignore[arg-type]  # never started
        paths: IpcPaths = transport.paths
        endpoint = EngineEndpoint(paths)
        raw_ctx = zmq.Context()
        # Each intruder is its own connection: zmq keeps order within a connection,
        # not across them, so the garbage may arrive before or after the real messages.
        intruder = raw_ctx.socket(zmq.PUSH)
        intruder2 = raw_ctx.socket(zmq.PUSH)
        try:
            # frontend -> engine, with garbage from a third socket in between
            intruder.connect(IpcPaths.address(paths.engine_input))
            add = AddRequest("r1", [1, 2, 3], WireSampling(n=2, temperature=0.5), 12.5)
            transport.send(add)
            for junk in GARBAGE:
                intruder.send(junk)
            intruder.send_multipart([b"two", b"parts"])
            transport.send(Abort(["r1"]))
            received = []
            for _ in range(50):
                received += endpoint.receive(0.1)
                if len(received) == 2 and endpoint.dropped == len(GARBAGE) + 1:
                    break
            assert received == [add, Abort(["r1"])]
            assert endpoint.dropped == len(GARBAGE) + 1
            assert received[0].params.kwargs() == {"n": 2, "temperature": 0.5}

            # engine -> frontend
            intruder2.connect(IpcPaths.address(paths.frontend_input))
            for junk in GARBAGE:
                intruder2.send(junk)
            out = Outputs([], [], _stats(), 99.0)
            endpoint.send(out)
            got: list[object] = []
            for _ in range(50):
                # receive() returns only with a real message; garbage arriving after
                # `out` is read (and dropped) by a later call, cut short here.
                with contextlib.suppress(TimeoutError):
                    got += await asyncio.wait_for(transport.receive(), 0.1)
                if got and transport.dropped == len(GARBAGE):
                    break
            assert got == [out]
            assert transport.dropped == len(GARBAGE)
        finally:
            intruder.close(linger=0)
            intruder2.close(linger=0)
            endpoint.close()
            raw_ctx.term()
            await transport.close(1.0)
        assert not Path(paths.directory).exists()

    asyncio.run(scenario())


def test_utility_methods_are_a_closed_set() -> None:
    decoder = msgspec.msgpack.Decoder(Utility)
    ok = decoder.decode(msgspec.msgpack.encode(Utility(3, "reset_prefix_cache")))
    assert ok == Utility(3, "reset_prefix_cache")
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode({"type": "utility", "call_id": 3, "method": "step"}))
