"""Request-size limits answered in OpenAI's error envelope.

uvicorn's own header limit answers a bare 400 without the envelope, so the server
sets uvicorn's limit well above ``max_header_bytes`` and checks here; the body is
read up to ``max_body_bytes`` before the application sees it, so an over-size or
lying ``Content-Length`` never reaches a handler.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvrun.server.errors import error_body

__all__ = ["DRAIN_LIMIT_BYTES", "RequestLimitsMiddleware"]

# An over-size body up to this size is read and dropped before the 400 is sent: a
# server that closes while the client is still sending makes the client's kernel see a
# reset, and the client never reads the answer. Beyond it the 400 goes out at once.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


async def _drain(receive: Receive, limit: int, timeout_s: float) -> None:
    """Read and drop the rest of a request body (at most ``limit`` bytes, ``timeout_s``)."""
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while size <= limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


async def _reject(send: Send, message: str, code: str, status: int = 400) -> None:
    body = json.dumps(error_body(message, status, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """Refuse requests whose headers or body exceed the configured sizes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        body_timeout_s: float,
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        # A body that has not fully arrived by then is refused (a slow or stalled client
        # must not hold a connection and a handler for ever).
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        header_bytes = sum(len(k) + len(v) + 4 for k, v in headers)  # "k: v\r\n"
        if header_bytes > self.max_header_bytes:
            await _reject(
                send,
                f"request headers are {header_bytes} bytes; the limit is "
                f"{self.max_header_bytes} bytes (--max-header-bytes)",
                "header_too_large",
            )
            return
        for name, value in headers:
            too_big = value.isdigit() and int(value) > self.max_body_bytes
            if name == b"content-length" and too_big:
                if int(value) <= DRAIN_LIMIT_BYTES:
                    await _drain(receive, DRAIN_LIMIT_BYTES, self.body_timeout_s)
                await _reject(send, self._body_message(int(value)), "body_too_large")
                return
        # Buffer the body (bounded by the limit) so chunked uploads are counted too.
        chunks: list[bytes] = []
        size = 0
        disconnect: Message | None = None
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        disconnect = message
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        message_text = self._body_message(size, at_least=True)
                        if message.get("more_body", False):
                            await _drain(receive, DRAIN_LIMIT_BYTES, self.body_timeout_s)
                        await _reject(send, message_text, "body_too_large")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _reject(
                send,
                f"the request body did not arrive within {self.body_timeout_s:g} s "
                f"({size} bytes came); the limit is --request-body-timeout",
                "body_timeout",
                status=408,
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if disconnect is not None:
                return disconnect
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            # After the body, the only thing left to hear is the client going away.
            return await receive()

        await self.app(scope, replay, send)

    def _body_message(self, size: int, *, at_least: bool = False) -> str:
        qualifier = "at least " if at_least else ""
        return (
            f"request body is {qualifier}{size} bytes; the limit is "
            f"{self.max_body_bytes} bytes (--max-request-body-bytes)"
        )
