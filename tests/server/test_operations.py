"""Metrics, continuous batching across HTTP requests, client disconnects, and the IPC socket
of a live server."""

from __future__ import annotations

import os
import pickle
import stat
import threading
import time

import httpx
import msgspec
import zmq

from tests.server.conftest import Server

LONG = {"max_tokens": 1000, "temperature": 0.0, "ignore_eos": True}


def test_metrics_names(server: Server, model_name: str) -> None:
    server.client().completions.create(model=model_name, prompt="Hello", max_tokens=3)
    with server.http() as http:
        answer = http.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    samples = server.metrics()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:time_per_output_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in samples, name
    assert samples["vllm:generation_tokens_total"] >= 3
    assert samples["vllm:time_to_first_token_seconds_count"] >= 1
    success = [k for k in samples if k.startswith("vllm:request_success_total{")]
    assert any('finished_reason="length"' in k for k in success)


def test_prefix_cache_hits_are_counted(server: Server, model_name: str) -> None:
    prompt = "A shared prefix that is long enough to fill whole KV blocks. " * 4
    client = server.client()
    client.completions.create(model=model_name, prompt=prompt + "First.", max_tokens=1)
    before = server.metrics()["vllm:prefix_cache_hits_total"]
    client.completions.create(model=model_name, prompt=prompt + "Second.", max_tokens=1)
    assert server.metrics()["vllm:prefix_cache_hits_total"] >= before + 32


def _stream_until_first_token(
    server: Server, prompt: str, got_first: threading.Event, release: threading.Event
) -> None:
    body = {"prompt": prompt, "stream": True, **LONG}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                got_first.set()
                release.wait(60)
                return  # closing the connection mid-stream


def test_requests_batch_and_disconnects_free_blocks(server: Server) -> None:
    """Four streaming clients run in the engine at once; dropping them frees their blocks."""
    server.wait_metric("vllm:num_requests_running", 0)
    release = threading.Event()
    firsts = [threading.Event() for _ in range(4)]
    workers = [
        threading.Thread(
            target=_stream_until_first_token,
            args=(server, f"Story number {i}: once upon a time", firsts[i], release),
        )
        for i in range(4)
    ]
    for w in workers:
        w.start()
    try:
        for event in firsts:
            assert event.wait(120)
        samples = server.metrics()
        assert samples["vllm:num_requests_running"] == 4
        assert samples["vllm:kv_cache_usage_perc"] > 0
    finally:
        release.set()
        for w in workers:
            w.join(60)
    server.wait_metric("vllm:num_requests_running", 0)
    server.wait_metric("vllm:kv_cache_usage_perc", 0.0)


def test_non_streaming_disconnect_aborts(server: Server) -> None:
    server.wait_metric("vllm:num_requests_running", 0)
    started = time.monotonic()
    try:
        with server.http(timeout=3.0) as http:
            http.post("/v1/completions", json={"prompt": "Tell me everything.", **LONG})
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("1000 tokens were expected to take longer than 3 s")
    server.wait_metric("vllm:num_requests_running", 0, timeout=5.0)
    server.wait_metric("vllm:kv_cache_usage_perc", 0.0, timeout=5.0)
    assert time.monotonic() - started < 10.0


def test_ipc_sockets_are_private(server: Server) -> None:
    (directory,) = server.rpc_dirs()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    sockets = sorted(p.name for p in directory.iterdir())
    assert sockets == ["engine-in.sock", "frontend-in.sock"]
    for name in sockets:
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600


def test_garbage_on_the_engine_socket_is_dropped(server: Server, model_name: str) -> None:
    (directory,) = server.rpc_dirs()
    ctx = zmq.Context()
    try:
        for name in ("engine-in.sock", "frontend-in.sock"):
            sock = ctx.socket(zmq.PUSH)
            sock.connect(f"ipc://{directory / name}")
            sock.send(b"\x00garbage\xff")
            sock.send(pickle.dumps({"type": "shutdown"}))
            sock.send(msgspec.msgpack.encode({"type": "shutdown", "extra": [1]}))
            sock.send_multipart([b"a", b"b"])
            sock.close(linger=2000)
    finally:
        ctx.term()
    deadline = time.monotonic() + 10
    while server.log().count("dropped") < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("on the engine socket") == 4
    assert server.log().count("on the frontend socket") == 4
    out = server.client().completions.create(model=model_name, prompt="Still up?", max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens >= 1
    assert httpx.get(server.base_url + "/health").status_code == 200
