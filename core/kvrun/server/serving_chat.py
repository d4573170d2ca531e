"""POST /v1/chat/completions: messages through the model's chat template, then generation."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kvrun.errors import KvrunError
from kvrun.server.beam_search import answer_with_beams, beam_search_params, check_beam_fields
from kvrun.server.chat_media import MediaPart, load_media, template_content
from kvrun.server.chat_output import MessageStream, OutputPlan
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
from kvrun.server.reasoning import make_reasoning_parser
from kvrun.server.serving_base import GenerationCall, stream_error
from kvrun.server.state import ServerState
from kvrun.server.streaming import SSE_DONE
from kvrun.server.structured import read_constraint
from kvrun.server.tool_parsers import tool_parser_class
from kvrun.server.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvrun.server.tools import ToolPlan, check_tool_constraint, plan_tools, template_tool_calls
from kvrun.server.wire import RequestDelta, WireMultiModal

__all__ = ["create_chat_completion", "render_chat", "render_messages"]

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


def _message_dicts(
    messages: list[ChatMessage], state: ServerState
) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    """Messages as plain dicts (text parts joined into one string; a message with media
    keeps its parts, as kvrun.server.chat_media shapes them), and the media parts."""
    out = []
    media: list[MediaPart] = []
    accepted = state.info.accepted_modalities
    for i, message in enumerate(messages):
        data = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            data["content"], parts = template_content(
                message.content, i, accepted, state.info.model_name
            )
            media.extend(parts)
        if "tool_calls" in data:
            data["tool_calls"] = template_tool_calls(data["tool_calls"], f"messages[{i}]")
        out.append(data)
    return out, media


async def render_messages(
    state: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text (media parts become the template's placeholders, unfetched)."""
    text, _ = await render_chat(
        state,
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
        tools=tools,
    )
    return text


async def render_chat(
    state: ServerState,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[MediaPart]]:
    """The prompt text and the messages' media parts (in order, not yet fetched); a
    template runs in the tokenizer's Jinja sandbox, in a worker thread so a slow one
    does not stall other requests."""
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
    dicts, media = _message_dicts(messages, state)
    try:
        text = await asyncio.to_thread(
            state.tokenizer.apply_chat_template,
            dicts,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            continue_final_message=continue_final_message,
            **kwargs,
        )
    except KvrunError as exc:
        raise ApiError(
            str(exc), 400, param="chat_template" if chat_template is not None else "messages"
        ) from None
    return text, media


class _Chat(GenerationCall):
    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        prompt_ids: list[int],
        plan: OutputPlan,
        media: WireMultiModal | None = None,
    ):
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
            model=req.model,
            multi_modal_data=[media],
        )
        self.req = req
        self.result = self.states[0]
        self.num_top = req.top_logprobs or 0
        self.plan = plan

    def _logprobs(self, seq: SequenceState, start: int) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        ids = seq.token_ids[start:]
        positions = (seq.logprobs or [])[start:]
        return {"content": chat_logprobs(ids, positions, self.num_top, self.state.tokenizer)}

    def response(self) -> dict[str, Any]:
        choices = []
        for seq in self.result.sequences:
            shaper = MessageStream(self.plan)
            choices.append(
                {
                    "index": seq.index,
                    "message": shaper.message(seq.text),
                    "logprobs": self._logprobs(seq, 0),
                    "finish_reason": shaper.finish_reason(seq.finish_reason),
                    "stop_reason": seq.stop_reason,
                }
            )
        return self.envelope(choices)

    async def stream(
        self, streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
    ) -> AsyncIterator[bytes]:
        (stream,), (first,) = streams, firsts
        sent_tokens = [0] * self.req.n
        shapers = [MessageStream(self.plan) for _ in range(self.req.n)]
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
                    finished = seq.finish_reason is not None
                    fields = shapers[j].feed(completion.text, finished)
                    logprobs = None
                    if len(seq.token_ids) > sent_tokens[j]:
                        logprobs = self._logprobs(seq, sent_tokens[j])
                        sent_tokens[j] = len(seq.token_ids)
                    if not (fields or logprobs or finished):
                        continue
                    choices.append(
                        {
                            "index": j,
                            "delta": fields,
                            "logprobs": logprobs,
                            "finish_reason": shapers[j].finish_reason(seq.finish_reason),
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
    check_beam_fields(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError("top_logprobs needs logprobs set to true", 400, param="top_logprobs")


def _output_plan(
    state: ServerState, req: ChatCompletionRequest, tools: ToolPlan, constrained: bool, prompt: str
) -> OutputPlan:
    """How the replies become messages: the tool parser the tool mode needs, and the
    reasoning parser unless a constraint shapes the reply from its first token."""
    config = state.config
    tool_parser: Any = None
    if tools.mode == "auto":
        assert config.tool_call_parser is not None
        tool_parser = tool_parser_class(config.tool_call_parser)
    elif tools.mode == "required":
        tool_parser = RequiredToolParser
    elif tools.function is not None:  # named
        tool_parser = functools.partial(NamedToolParser, tools.function)
    reasoning = None
    if config.reasoning_parser is not None and not constrained:
        reasoning = functools.partial(
            make_reasoning_parser, config.reasoning_parser, prompt, req.chat_template_kwargs
        )
    return OutputPlan(tool_parser, reasoning, calls_finish=tools.mode != "named")


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ChatCompletionRequest)
    state.check_model(req.model)
    _check_unsupported(req)
    tools = plan_tools(req, state.config)
    check_caps(req, state.config.limits)  # before the template renders
    constraint = await read_constraint(req, state.info.structured_outputs_backend)
    if tools.constraint is not None:
        if constraint is not None:
            raise ApiError(
                f"tool_choice {json.dumps(req.tool_choice)} holds the reply to the tools' "
                "schema and cannot be combined with another output constraint "
                "(response_format, structured_outputs, guided_*); drop one of them",
                400,
                param="tool_choice",
            )
        constraint = await check_tool_constraint(tools)
    state.check_alive()
    text, media_parts = await render_chat(
        state,
        req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template=req.chat_template,
        chat_template_kwargs=req.chat_template_kwargs,
        tools=tools.tools,
    )
    check_text_size(text, "messages", state.info, state.tokenizer.max_token_chars)
    prompt_ids = await asyncio.to_thread(
        state.tokenizer.encode, text, add_special_tokens=req.add_special_tokens
    )
    check_prompt(prompt_ids, state.info, "messages")
    media = None
    if media_parts:
        if req.use_beam_search:
            raise ApiError(
                "use_beam_search is not supported with media content parts",
                400,
                param="use_beam_search",
            )
        config = state.config
        media = await load_media(
            media_parts, config.media, config.limit_mm_per_prompt, req.mm_processor_kwargs
        )
    elif req.mm_processor_kwargs is not None:
        # no media: the engine still checks the settings (an unknown key is a 400 as with
        # media; a text-only model refuses them), and they act on nothing
        media = WireMultiModal(processor_kwargs=dict(req.mm_processor_kwargs))
    requested: int | None = req.max_tokens
    param = "max_tokens"
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    max_tokens: int | None = resolve_max_tokens(requested, param, len(prompt_ids), state.info, None)
    if media_parts and requested is None:
        # the engine expands the media placeholders: the room is what is left after that
        max_tokens = None
    choice = SamplingChoice(
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        logprobs_param="top_logprobs",
        prompt_logprobs=req.prompt_logprobs,
    )
    plan = _output_plan(state, req, tools, constraint is not None, text)
    if (
        tools.mode == "auto"
        and tool_parser_class(state.config.tool_call_parser or "").needs_special_tokens
        and "skip_special_tokens" not in req.model_fields_set
    ):
        # the format's markers are special tokens: keep them in the text (as vLLM does)
        req = req.model_copy(update={"skip_special_tokens": False})
    sampling = build_sampling(
        req, max_tokens=max_tokens, choice=choice, info=state.info, structured_outputs=constraint
    )
    chat = _Chat(state, req, prompt_ids, plan, media)
    if req.use_beam_search:  # the n best beams of width n
        assert max_tokens is not None  # media (max_tokens left to the engine) refuse beams
        params = beam_search_params(req, max_tokens, [prompt_ids], state.info)
        skip = req.skip_special_tokens
        return await answer_with_beams(chat, request, params, skip_special_tokens=skip)
    return await chat.answer(request, [sampling], req.stream)
