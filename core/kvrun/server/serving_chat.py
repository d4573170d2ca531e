"""POST /v1/chat/completions: messages through the model's chat template, then generation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kvrun.errors import KvrunError
from kvrun.server.deltas import SequenceState
from kvrun.server.engine_client import RequestStream
from kvrun.server.errors import ApiError, EngineDeadError
from kvrun.server.logprobs import chat_logprobs
from kvrun.server.params import (
    SamplingChoice,
    build_sampling,
    check_caps,
    check_prompt,
    check_text_size,
    resolve_max_tokens,
)
from kvrun.server.protocol import ChatCompletionRequest, ChatMessage, parse_body
from kvrun.server.serving_base import GenerationCall, stream_error
from kvrun.server.state import ServerState
from kvrun.server.streaming import SSE_DONE
from kvrun.server.wire import RequestDelta

__all__ = ["create_chat_completion", "render_messages"]

# Names the renderer passes itself; chat_template_kwargs may not override them.
# Names chat_template_kwargs may not set: the render's own arguments.
_RESERVED_TEMPLATE_NAMES = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "self",
    }
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
    asked = chat_template is not None or "chat_template" in kwargs
    if asked and not state.config.trust_request_chat_template:
        raise ApiError(
            "chat_template in a request is refused: this server renders only the model's own "
            "chat template; start it with --trust-request-chat-template to accept templates "
            "from requests",
            400,
            param="chat_template",
        )
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


class _Chat(GenerationCall):
    def __init__(self, state: ServerState, req: ChatCompletionRequest, prompt_ids: list[int]):
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        super().__init__(
            state,
            call_id=call_id,
            object_name="chat.completion",
            chunk_object_name="chat.completion.chunk",
            stream_options=req.stream_options,
            n=req.n,
            prompt_ids=[prompt_ids],
            request_ids=[call_id],
        )
        self.req = req
        self.result = self.states[0]
        self.num_top = req.top_logprobs or 0

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
        return self.envelope(choices)

    async def stream(
        self, streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
    ) -> AsyncIterator[bytes]:
        (stream,), (first,) = streams, firsts
        sent_tokens = [0] * self.req.n
        try:
            for j in range(self.req.n):
                role = {"role": "assistant", "content": ""}
                choice = {"index": j, "delta": role, "logprobs": None, "finish_reason": None}
                yield self.chunk([choice], self.chunk_usage())
            delta: RequestDelta | None = first
            while delta is not None:
                self.result.apply(delta)
                choices = []
                for completion in delta.completions:
                    seq = self.result.sequences[completion.index]
                    j = seq.index
                    text = completion.text
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
                    yield self.chunk(choices, self.chunk_usage())
                delta = None if stream.done else await stream.get()
            if self.include_usage:
                yield self.chunk([], self.usage())
        except (EngineDeadError, ApiError) as exc:
            yield stream_error(exc)
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


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    state.check_model(req.model)
    _check_unsupported(req)
    check_caps(req, state.config.limits)  # before the template renders
    state.check_alive()
    text = await render_messages(
        state,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template=req.chat_template,
        chat_template_kwargs=req.chat_template_kwargs,
    )
    check_text_size(text, "messages", state.info, state.tokenizer.max_token_chars)
    prompt_ids = await asyncio.to_thread(
        state.tokenizer.encode, text, add_special_tokens=req.add_special_tokens
    )
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
    sampling = build_sampling(req, max_tokens=max_tokens, choice=choice, info=state.info)
    chat = _Chat(state, req, prompt_ids)
    return await chat.answer(request, [sampling], req.stream)
