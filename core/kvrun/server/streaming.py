"""Plumbing shared by the generation routes: SSE framing, merging request streams,
noticing a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvrun.server.engine_client import RequestStream
from kvrun.server.wire import RequestDelta

__all__ = [
    "SSE_DONE",
    "ClientDisconnected",
    "SSEResponse",
    "merged",
    "sse_event",
    "until_disconnect",
]

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event; JSON never holds a raw newline, so one data line suffices."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before its answer was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientDisconnected as soon as the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def merged(
    streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Every stream's deltas as they come, tagged with the stream's position.

    ``firsts`` are the deltas already read from each stream (one each).
    """
    for i, delta in enumerate(firsts):
        yield i, delta
    queue: asyncio.Queue[tuple[int, RequestDelta | BaseException]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            while not stream.done:
                queue.put_nowait((i, await stream.get()))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams) if not s.done]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator and runs
    ``on_close`` (which aborts unfinished requests) however the stream ends."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
