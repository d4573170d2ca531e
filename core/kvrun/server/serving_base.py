"""What /v1/completions and /v1/chat/completions share: response envelopes, SSE chunks,
usage, and the life of one call (submit, wait, stream or collect, abort what is left).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.server.deltas import RequestState
from kvrun.server.engine_client import RequestStream
from kvrun.server.errors import ApiError, EngineDeadError, error_body
from kvrun.server.protocol import StreamOptions
from kvrun.server.state import ServerState
from kvrun.server.streaming import ClientDisconnected, SSEResponse, sse_event, until_disconnect
from kvrun.server.wire import RequestDelta, WireMultiModal, WireSampling

__all__ = ["GenerationCall", "stream_error"]

logger = logging.getLogger(__name__)


def stream_error(exc: EngineDeadError | ApiError) -> bytes:
    """The SSE event that ends a stream which failed after its 200 was sent."""
    if isinstance(exc, EngineDeadError):
        return sse_event(error_body(f"the engine died: {exc}", 500))
    return sse_event(exc.body())


async def _firsts(streams: Sequence[RequestStream]) -> list[RequestDelta]:
    return [await s.get() for s in streams]


async def _collect(states: Sequence[RequestState], streams: Sequence[RequestStream]) -> None:
    for state, stream in zip(states, streams, strict=True):
        while not stream.done:
            state.apply(await stream.get())


class GenerationCall(ABC):
    """One generation call: one engine request per prompt, each with ``n`` sequences.

    Subclasses build the choices: :meth:`response` for a whole answer and
    :meth:`stream` for server-sent events.
    """

    def __init__(
        self,
        state: ServerState,
        *,
        call_id: str,
        object_name: str,  # "object" of the whole answer
        chunk_object_name: str,  # "object" of each streamed chunk
        stream_options: StreamOptions | None,
        n: int,
        prompt_ids: Sequence[list[int]],  # token ids per prompt
        request_ids: Sequence[str],  # engine request id per prompt
        model: str | None = None,  # the request's "model": the base model or an adapter
        multi_modal_data: Sequence[WireMultiModal | None] | None = None,  # media per prompt
    ) -> None:
        assert len(prompt_ids) == len(request_ids)
        self.state = state
        self.lora_name = state.lora_for(model)  # the LoRA adapter the requests run with
        self.model_name = self.lora_name or state.info.model_name
        self.id = call_id
        self.created = int(time.time())
        self.object_name = object_name
        self.chunk_object_name = chunk_object_name
        self.stream_options = stream_options
        self.prompt_ids = list(prompt_ids)
        self.request_ids = list(request_ids)
        self.multi_modal_data = list(multi_modal_data or [None] * len(self.prompt_ids))
        self.states = [RequestState(n) for _ in self.prompt_ids]

    # bodies -------------------------------------------------------------------------
    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM's stream_options.continuous_usage_stats)."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    def usage(self) -> dict[str, int]:
        """Prompt tokens as the engine ran them (media placeholders expanded, as vLLM and
        OpenAI count), the frontend's own count until the engine has said."""
        prompt = sum(
            len(ids) if state.num_prompt_tokens is None else state.num_prompt_tokens
            for ids, state in zip(self.prompt_ids, self.states, strict=True)
        )
        completion = sum(s.num_generated for s in self.states)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
        """One SSE chunk; ``usage`` is sent (null when None) only if the client asked for it."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_object_name,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return sse_event(body)

    def chunk_usage(self) -> dict[str, int] | None:
        """The usage a chunk with choices carries."""
        return self.usage() if self.continuous_usage else None

    @abstractmethod
    def response(self) -> dict[str, Any]:
        """The whole answer once every request finished."""

    @abstractmethod
    def stream(
        self, streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
    ) -> AsyncIterator[bytes]:
        """The SSE events, from each request's first delta (already read) on."""

    # life cycle ---------------------------------------------------------------------
    async def answer(
        self, request: Request, samplings: Sequence[WireSampling], stream: bool
    ) -> Response:
        """Submit the requests and answer: SSE when ``stream``, else one JSON body.

        Whatever is unfinished when the answer ends (client gone, engine dead,
        stream closed) is aborted, so its KV blocks are freed.
        """
        client = self.state.client
        streaming = False
        try:
            streams = [
                client.add_request(rid, ids, sampling, self.lora_name, media)
                for rid, ids, sampling, media in zip(
                    self.request_ids,
                    self.prompt_ids,
                    samplings,
                    self.multi_modal_data,
                    strict=True,
                )
            ]
            # Wait for each request's first output before answering, so a request the
            # engine refuses still gets its 400 rather than a broken event stream.
            firsts = await until_disconnect(request, _firsts(streams))
            for state, first in zip(self.states, firsts, strict=True):
                state.note_prompt(first)  # usage's prompt length, before any chunk
            if stream:
                streaming = True
                return SSEResponse(
                    self.stream(streams, firsts), on_close=lambda: client.abort(self.request_ids)
                )
            for state, first in zip(self.states, firsts, strict=True):
                state.apply(first)
            await until_disconnect(request, _collect(self.states, streams))
            return JSONResponse(self.response())
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening
        except EngineDeadError as exc:
            raise ApiError(f"the engine died: {exc}", 500) from None
        finally:
            if not streaming:
                client.abort(self.request_ids)
