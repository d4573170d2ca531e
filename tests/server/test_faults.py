"""Engine death, keep-alive, SIGTERM with requests in flight, in-process engine: each on
its own short-lived server, except the body timeout, which runs first on the keep-alive
server (it leaves that server as it found it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import Server, launch

LONG = {"prompt": "Write a very long story.", "max_tokens": 900, "temperature": 0.0,
        "ignore_eos": True}  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has been reaped only once /proc forgets it
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def _in_flight(server: Server, body: dict[str, Any], results: list[Any], stream: bool) -> None:
    """One request in a thread: appends (status, body text) when it ends."""
    try:
        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120) as http:
            if stream:
                with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as a:
                    results.append((a.status_code, "".join(a.iter_text())))
            else:
                a = http.post("/v1/completions", json=body)
                results.append((a.status_code, a.text))
    except httpx.TransportError as exc:
        results.append((None, repr(exc)))


def _start(
    server: Server, body: dict[str, Any], stream: bool
) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []
    thread = threading.Thread(target=_in_flight, args=(server, body, results, stream))
    thread.start()
    return thread, results


def _wait_running(server: Server, n: int) -> None:
    server.wait_metric("vllm:num_requests_running", n, timeout=60)


@pytest.fixture(scope="module")
def keep_alive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Kept alive on engine death, with a 2 s request-body timeout: the body-timeout test
    uses it first, then the keep-alive test kills its engine."""
    srv = launch(
        tmp_path_factory.mktemp("keep-alive"),
        args=["--request-body-timeout", "2"],
        env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"},
    )
    try:
        yield srv
    finally:
        srv.cleanup()


def _sse_error(text: str) -> dict[str, Any]:
    events = [e for e in text.split("\n\n") if e.startswith("data: {")]
    last: dict[str, Any] = json.loads(events[-1][len("data: ") :])
    assert text.rstrip().endswith("data: [DONE]")
    return last


def test_hung_engine_fails_requests_and_exits(spawn: Callable[..., Server]) -> None:
    server = spawn(env={"VLLM_ENGINE_ITERATION_TIMEOUT_S": "10"})
    engine = server.engine_pid()
    with server.http() as http:  # the first steps warm up slowly on a loaded machine
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).is_success
    plain, plain_out = _start(server, LONG, stream=False)
    streamed, stream_out = _start(server, LONG, stream=True)
    _wait_running(server, 2)
    os.kill(engine, signal.SIGSTOP)  # the engine hangs mid-generation
    plain.join(60)
    streamed.join(60)
    status, text = plain_out[0]
    assert status == 500
    error = json.loads(text)["error"]
    assert error["type"] == "server_error"
    assert "VLLM_ENGINE_ITERATION_TIMEOUT_S=10" in error["message"]
    assert stream_out[0][0] == 200
    assert _sse_error(stream_out[0][1])["error"]["code"] == 500
    assert server.proc.wait(60) == 1
    assert not _alive(engine)
    assert server.rpc_dirs() == []


def test_a_body_that_never_arrives_is_refused_in_time(keep_alive_server: Server) -> None:
    """Before test_keep_alive_after_engine_death, which kills this server's engine."""
    server = keep_alive_server
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
        slow.sendall(head.encode() + b'{"prompt": "Hi", ')  # and then nothing more
        start = time.monotonic()
        answer = b""
        while chunk := slow.recv(65536):  # the server answers, then closes
            answer += chunk
        waited = time.monotonic() - start
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_timeout"
    assert error["message"].startswith("the request body did not arrive within 2 s (17 bytes")
    assert 1.5 < waited < 10
    with server.http() as http:  # everyone else was served meanwhile
        assert (
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        )


def test_keep_alive_after_engine_death(keep_alive_server: Server) -> None:
    server = keep_alive_server
    engine = server.engine_pid()
    plain, plain_out = _start(server, LONG, stream=False)
    _wait_running(server, 1)
    os.kill(engine, signal.SIGKILL)
    plain.join(60)
    status, text = plain_out[0]
    assert status == 500
    assert f"pid {engine}" in json.loads(text)["error"]["message"]
    health = httpx.get(server.base_url + "/health")
    assert health.status_code == 503
    assert health.json()["error"]["type"] == "server_error"
    time.sleep(1.0)
    assert server.proc.poll() is None
    with server.http() as http:
        answer = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 503
        assert http.get("/v1/models").status_code == 200
    assert server.stop() == 0
    assert server.rpc_dirs() == []


def test_sigterm_lets_in_flight_requests_finish(spawn: Callable[..., Server]) -> None:
    server = spawn(args=["--shutdown-timeout", "60", "--root-path", "/api"])
    # behind --root-path the allowlist still matches, and without dev mode or a profiler
    # directory the gated routes do not exist
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/api/health").status_code == 401
    with server.http() as http:
        assert http.get("/v1/models").status_code == 200
        assert http.post("/reset_prefix_cache").status_code == 404
        assert http.post("/start_profile").status_code == 404

    engine = server.engine_pid()
    short = {"prompt": "Count to ten:", "max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    first, first_out = _start(server, short, stream=True)
    second, second_out = _start(server, short, stream=False)
    _wait_running(server, 2)
    # as `timeout`, systemd or a terminal do: the engine process gets the signal too
    os.killpg(server.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/health", timeout=5)  # no new connections
    first.join(90)
    second.join(90)
    assert first_out[0][0] == 200, first_out
    events = [e for e in first_out[0][1].split("\n\n") if e.startswith("data: {")]
    assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] == "length"
    assert first_out[0][1].rstrip().endswith("data: [DONE]")
    assert second_out[0][0] == 200, second_out
    assert json.loads(second_out[0][1])["usage"]["completion_tokens"] == 16
    assert server.proc.wait(60) == 0
    assert not _alive(engine)
    assert server.rpc_dirs() == []
    assert list(server.rpc_base.iterdir()) == []


def test_in_process_engine_and_shutdown_timeout(spawn: Callable[..., Server]) -> None:
    server = spawn(
        api_key=None,
        args=["--shutdown-timeout", "2"],
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": "1"},
    )
    assert "engine process" not in server.log()
    assert server.rpc_dirs() == []
    with server.http() as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
    client = server.client()
    outs = [
        client.completions.create(model=model, prompt=p, max_tokens=5, temperature=0.0)
        for p in ("One", "Two")
    ]
    assert all(o.usage is not None and o.usage.completion_tokens == 5 for o in outs)
    threads = [_start(server, {**LONG, "max_tokens": 8}, stream=True) for _ in range(3)]
    for t, _ in threads:
        t.join(120)
    assert all(r[0][0] == 200 and "[DONE]" in r[0][1] for _, r in threads)

    # a request longer than --shutdown-timeout is cut off; the server still stops in time
    thread, out = _start(server, LONG, stream=True)
    _wait_running(server, 1)
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - began < 15
    thread.join(30)
    assert '"finish_reason":"length"' not in out[0][1]


def test_a_shutdown_ends_in_flight_requests_with_abort(spawn: Callable[..., Server]) -> None:
    # vLLM's contract: past --shutdown-timeout, each in-flight request still gets its
    # answer in the OpenAI shape, finish_reason "abort"; a stream its last chunk and [DONE].
    server = spawn(args=["--shutdown-timeout", "0"])
    streamed, streamed_out = _start(server, LONG, stream=True)
    whole, whole_out = _start(server, {**LONG, "n": 2}, stream=False)
    _wait_running(server, 3)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    streamed.join(30)
    whole.join(30)
    status, text = streamed_out[0]
    assert status == 200 and text.rstrip().endswith("data: [DONE]"), text[-500:]
    assert _sse_error(text)["choices"][0]["finish_reason"] == "abort"
    status, text = whole_out[0]
    assert status == 200, text[-500:]
    choices = json.loads(text)["choices"]
    assert [c["finish_reason"] for c in choices] == ["abort", "abort"]
    assert all(c["text"] for c in choices)  # what was generated before the end is kept
    log = server.log()
    assert "CancelledError" not in log and "Traceback" not in log, log[-3000:]
