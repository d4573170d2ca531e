"""POST /v1/chat/completions: messages through the model's chat template, then generation."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.errors import KvrunError
from kvrun.server.deltas import RequestState, SequenceState
from kvrun.server.engine_client import RequestStream
from kvrun.server.errors import ApiError, EngineDeadError, error_body
from kvrun.server.logprobs import chat_logprobs
from kvrun.server.params import SamplingChoice, build_sampling, check_prompt, resolve_max_tokens
from kvrun.server.protocol import ChatCompletionRequest, ChatMessage, parse_body
from kvrun.server.state import ServerState
from kvrun.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    sse_event,
    until_disconnect,
)
from kvrun.server.wire import RequestDelta

__all__ = ["create_chat_completion", "render_messages"]

logger = logging.getLogger(__name__)

# Names the renderer passes itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_NAMES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message"}
)


def _message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts, content parts joined into one string."""
    out = []
    for i, message in enumerate(messages):
        data = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            texts = []
            for part in message.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(
                        f"messages[{i}].content has a part of type {part.get('type')!r}; "
                        "only text parts ({'type': 'text', 'text': ...}) are supported",
                        400,
                        param="messages",
                    )
                texts.append(part["text"])
            data["content"] = "\n".join(texts)
        out.append(data)
    return out


async def render_messages(
    state: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> str:
    """The prompt text; a template runs in the tokenizer's Jinja sandbox, in a worker
    thread so a slow one does not stall other requests."""
    kwargs = dict(chat_template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_NAMES & kwargs.keys())
    if clash:
        raise ApiError(
            f"chat_template_kwargs may not set {', '.join(clash)}; use the request fields",
            400,
            param="chat_template_kwargs",
        )
    dicts = _message_dicts(messages)
    try:
        return await asyncio.to_thread(
            state.tokenizer.apply_chat_template,
            dicts,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except KvrunError as exc:
        raise ApiError(
            str(exc), 400, param="chat_template" if chat_template is not None else "messages"
        ) from None


class _Chat:
    def __init__(self, state: ServerState, req: ChatCompletionRequest, prompt_ids: list[int]):
        self.state = state
        self.req = req
        self.prompt_ids = prompt_ids
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.result = RequestState(req.n)
        self.num_top = req.top_logprobs or 0

    def usage(self) -> dict[str, int]:
        prompt = len(self.prompt_ids)
        completion = self.result.num_generated
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _logprobs(self, seq: SequenceState, start: int) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        ids = seq.token_ids[start:]
        positions = (seq.logprobs or [])[start:]
        return {"content": chat_logprobs(ids, positions, self.num_top, self.state.tokenizer)}

    def response(self) -> dict[str, Any]:
        choices = [
            {
                "index": seq.index,
                "message": {"role": "assistant", "content": seq.text},
                "logprobs": self._logprobs(seq, 0),
                "finish_reason": seq.finish_reason,
                "stop_reason": seq.stop_reason,
            }
            for seq in self.result.sequences
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.info.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.state.info.model_name,
            "choices": choices,
        }
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            body["usage"] = usage
        return sse_event(body)

    async def stream(self, stream: RequestStream, first: RequestDelta) -> AsyncIterator[bytes]:
        options = self.req.stream_options
        continuous = (
            options is not None and options.include_usage and options.continuous_usage_stats
        )
        sent_chars = [0] * self.req.n
        sent_tokens = [0] * self.req.n
        try:
            for j in range(self.req.n):
                role = {"role": "assistant", "content": ""}
                choice = {"index": j, "delta": role, "logprobs": None, "finish_reason": None}
                yield self.chunk([choice], self.usage() if continuous else None)
            delta: RequestDelta | None = first
            while delta is not None:
                self.result.apply(delta)
                choices = []
                for completion in delta.completions:
                    seq = self.result.sequences[completion.index]
                    j = seq.index
                    if len(seq.text) < sent_chars[j]:
                        logger.warning("%s: the engine took back streamed text", self.id)
                        sent_chars[j] = len(seq.text)
                    text = seq.text[sent_chars[j] :]
                    sent_chars[j] = len(seq.text)
                    logprobs = None
                    if len(seq.token_ids) > sent_tokens[j]:
                        logprobs = self._logprobs(seq, sent_tokens[j])
                        sent_tokens[j] = len(seq.token_ids)
                    if not (text or logprobs or seq.finish_reason):
                        continue
                    choices.append(
                        {
                            "index": j,
                            "delta": {"content": text} if text else {},
                            "logprobs": logprobs,
                            "finish_reason": seq.finish_reason,
                            "stop_reason": seq.stop_reason,
                        }
                    )
                if choices:
                    yield self.chunk(choices, self.usage() if continuous else None)
                delta = None if stream.done else await stream.get()
            if options is not None and options.include_usage:
                yield self.chunk([], self.usage())
        except EngineDeadError as exc:
            yield sse_event(error_body(f"the engine died: {exc}", 500))
        except ApiError as exc:
            yield sse_event(exc.body())
        yield SSE_DONE


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools and req.tool_choice != "none":
        raise ApiError(
            "tool calling is not supported; omit tools or set tool_choice to 'none'",
            400,
            param="tools",
        )
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise ApiError(
            f"response_format {req.response_format.get('type')!r} is not supported; "
            "accepted: {'type': 'text'}",
            400,
            param="response_format",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError("top_logprobs needs logprobs set to true", 400, param="top_logprobs")


async def _collect(chat: _Chat, stream: RequestStream) -> None:
    while not stream.done:
        chat.result.apply(await stream.get())


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    state.check_model(req.model)
    _check_unsupported(req)
    state.check_alive()
    text = await render_messages(
        state,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template=req.chat_template,
        chat_template_kwargs=req.chat_template_kwargs,
    )
    prompt_ids = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    check_prompt(prompt_ids, state.info, "messages")
    requested: int | None = req.max_tokens
    param = "max_tokens"
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    max_tokens = resolve_max_tokens(requested, param, len(prompt_ids), state.info, None)
    choice = SamplingChoice(
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        logprobs_param="top_logprobs",
        prompt_logprobs=req.prompt_logprobs,
    )
    sampling = build_sampling(
        req, max_tokens=max_tokens, choice=choice, limits=state.config.limits, info=state.info
    )
    chat = _Chat(state, req, prompt_ids)
    client = state.client
    streaming = False
    try:
        stream = client.add_request(chat.id, prompt_ids, sampling)
        first = await until_disconnect(request, stream.get())
        if req.stream:
            streaming = True
            return SSEResponse(chat.stream(stream, first), on_close=lambda: client.abort([chat.id]))
        chat.result.apply(first)
        await until_disconnect(request, _collect(chat, stream))
        return JSONResponse(chat.response())
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineDeadError as exc:
        raise ApiError(f"the engine died: {exc}", 500) from None
    finally:
        if not streaming:
            client.abort([chat.id])
