"""Request-size limits: over-long headers and over-size bodies get 400 in the envelope."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kvrun.server.limits import RequestLimitsMiddleware


class _Echo:
    """Inner app: answers with the body it received, then waits for the disconnect."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.after_body: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        self.after_body.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})


def _run(
    headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[list[dict[str, Any]], _Echo]:
    inner = _Echo()
    app = RequestLimitsMiddleware(
        inner, max_header_bytes=200, max_body_bytes=10, body_timeout_s=30.0
    )
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] + [{"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "headers": headers}, receive, send))
    return sent, inner


def _error(sent: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_body_within_the_limit_is_replayed_whole() -> None:
    sent, inner = _run([], [b"01234", b"56789"])
    assert inner.bodies == [b"0123456789"]
    assert inner.after_body == ["http.disconnect"]
    assert sent[1]["body"] == b"0123456789"


def test_declared_length_over_the_limit() -> None:
    sent, inner = _run([(b"content-length", b"11")], [b"x" * 11])
    assert inner.bodies == []
    assert _error(sent) == (
        400,
        {
            "error": {
                "message": "request body is 11 bytes; the limit is 10 bytes "
                "(--max-request-body-bytes)",
                "type": "invalid_request_error",
                "param": None,
                "code": "body_too_large",
            }
        },
    )


def test_chunked_body_over_the_limit() -> None:
    sent, inner = _run([], [b"123456", b"789012"])
    assert inner.bodies == []
    status, body = _error(sent)
    assert status == 400
    assert body["error"]["message"] == (
        "request body is at least 12 bytes; the limit is 10 bytes (--max-request-body-bytes)"
    )


def test_headers_over_the_limit() -> None:
    sent, inner = _run([(b"x-long", b"a" * 200)], [b""])
    assert inner.bodies == []
    status, body = _error(sent)
    assert status == 400
    assert body["error"]["code"] == "header_too_large"
    assert body["error"]["message"] == (
        "request headers are 210 bytes; the limit is 200 bytes (--max-header-bytes)"
    )


def test_an_over_size_body_is_read_to_its_end_before_the_400() -> None:
    """A server that closes while the client still sends makes the client's kernel see a
    reset, and the answer is lost: the rest of the body is read first (within bounds)."""
    events: list[str] = []
    chunks = [b"x" * 8, b"x" * 8, b"x" * 8]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        events.append("read")
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        events.append(message["type"])

    for headers in ([(b"content-length", b"24")], []):  # declared, and found while reading
        events.clear()
        messages[:] = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        app = RequestLimitsMiddleware(
            _Echo(), max_header_bytes=200, max_body_bytes=10, body_timeout_s=30.0
        )
        asyncio.run(app({"type": "http", "headers": headers}, receive, send))
        assert events == ["read"] * 3 + ["http.response.start", "http.response.body"], headers
