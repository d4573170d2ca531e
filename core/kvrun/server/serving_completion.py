"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) to text."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.server.deltas import RequestState, SequenceState
from kvrun.server.engine_client import RequestStream
from kvrun.server.errors import ApiError, EngineDeadError, error_body
from kvrun.server.logprobs import completion_logprobs
from kvrun.server.params import (
    SamplingChoice,
    build_sampling,
    check_prompt,
    resolve_max_tokens,
)
from kvrun.server.protocol import CompletionRequest, parse_body
from kvrun.server.state import ServerState
from kvrun.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    SSEResponse,
    merged,
    sse_event,
    until_disconnect,
)
from kvrun.server.wire import RequestDelta

__all__ = ["create_completion"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _prompts(req: CompletionRequest, state: ServerState) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; text is decoded from ids for token prompts (echo)."""
    prompt = req.prompt
    tok = state.tokenizer
    if isinstance(prompt, str):
        return [(prompt, tok.encode(prompt, add_special_tokens=req.add_special_tokens))]
    if not prompt:
        raise ApiError("prompt is empty", 400, param="prompt")
    if all(isinstance(p, str) for p in prompt):
        texts: list[str] = prompt  # type: ignore[assignment]
        return [(t, tok.encode(t, add_special_tokens=req.add_special_tokens)) for t in texts]
    if all(isinstance(p, int) for p in prompt):
        ids: list[int] = prompt  # type: ignore[assignment]
        lists = [ids]
    else:
        lists = prompt  # type: ignore[assignment]
    out = []
    for token_ids in lists:
        check_prompt(token_ids, state.info, "prompt")
        out.append((tok.decode(token_ids, skip_special_tokens=False), token_ids))
    return out


class _Completion:
    """One /v1/completions call: its parsed request, prompts and engine streams."""

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        self.state = state
        self.req = req
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompts = _prompts(req, state)
        echo_logprobs = req.logprobs if req.echo else None
        self.choice = SamplingChoice(
            logprobs=req.logprobs,
            logprobs_param="logprobs",
            prompt_logprobs=req.prompt_logprobs
            if req.prompt_logprobs is not None
            else echo_logprobs,
        )
        self.samplings = []
        for _, ids in self.prompts:
            check_prompt(ids, state.info, "prompt")
            max_tokens = resolve_max_tokens(
                req.max_tokens, "max_tokens", len(ids), state.info, DEFAULT_MAX_TOKENS
            )
            self.samplings.append(
                build_sampling(
                    req,
                    max_tokens=max_tokens,
                    choice=self.choice,
                    limits=state.config.limits,
                    info=state.info,
                )
            )
        self.request_ids = [f"{self.id}-{i}" for i in range(len(self.prompts))]
        self.states = [RequestState(req.n) for _ in self.prompts]

    def usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = sum(s.num_generated for s in self.states)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _echo_logprobs(self, i: int, num: int) -> dict[str, Any]:
        _, ids = self.prompts[i]
        positions: Sequence[Any] = self.states[i].prompt_logprobs or [None] * len(ids)
        return completion_logprobs(ids, positions, num, self.state.tokenizer, 0)

    def choice_body(self, i: int, seq: SequenceState) -> dict[str, Any]:
        text = self.prompts[i][0]
        logprobs: dict[str, Any] | None = None
        num = self.req.logprobs
        if num is not None:
            offset = 0
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if self.req.echo:
                logprobs = self._echo_logprobs(i, num)
                offset = sum(len(t) for t in logprobs["tokens"])
            generated = completion_logprobs(
                seq.token_ids, seq.logprobs or [], num, self.state.tokenizer, offset
            )
            for key, values in generated.items():
                logprobs[key] = logprobs[key] + values
        return {
            "index": i * self.req.n + seq.index,
            "text": (text if self.req.echo else "") + seq.text,
            "logprobs": logprobs,
            "finish_reason": seq.finish_reason,
            "stop_reason": seq.stop_reason,
        }

    def response(self) -> dict[str, Any]:
        choices = [
            self.choice_body(i, seq) for i, st in enumerate(self.states) for seq in st.sequences
        ]
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.info.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.info.model_name,
            "choices": choices,
        }
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            body["usage"] = usage
        return sse_event(body)

    async def stream(
        self, streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
    ) -> AsyncIterator[bytes]:
        sent_chars: dict[tuple[int, int], int] = {}
        sent_tokens: dict[tuple[int, int], int] = {}
        offsets: dict[tuple[int, int], int] = {}
        options = self.req.stream_options
        continuous = (
            options is not None and options.include_usage and options.continuous_usage_stats
        )
        num = self.req.logprobs
        try:
            async for i, delta in merged(streams, firsts):
                state = self.states[i]
                state.apply(delta)
                choices = []
                for completion in delta.completions:
                    seq = state.sequences[completion.index]
                    key = (i, seq.index)
                    prefix, logprobs = "", None
                    if key not in sent_chars:
                        sent_chars[key] = sent_tokens[key] = offsets[key] = 0
                        if self.req.echo:
                            prefix = self.prompts[i][0]
                            if num is not None:
                                logprobs = self._echo_logprobs(i, num)
                                offsets[key] = sum(len(t) for t in logprobs["tokens"])
                    if len(seq.text) < sent_chars[key]:
                        logger.warning("%s: the engine took back streamed text", self.id)
                        sent_chars[key] = len(seq.text)
                    text = seq.text[sent_chars[key] :]
                    sent_chars[key] = len(seq.text)
                    new_ids = seq.token_ids[sent_tokens[key] :]
                    if num is not None and new_ids:
                        positions = (seq.logprobs or [])[sent_tokens[key] :]
                        part = completion_logprobs(
                            new_ids, positions, num, self.state.tokenizer, offsets[key]
                        )
                        offsets[key] += sum(len(t) for t in part["tokens"])
                        if logprobs is None:
                            logprobs = part
                        else:
                            logprobs = {k: logprobs[k] + part[k] for k in part}
                    sent_tokens[key] = len(seq.token_ids)
                    if not (prefix or text or logprobs or seq.finish_reason):
                        continue
                    choices.append(
                        {
                            "index": i * self.req.n + seq.index,
                            "text": prefix + text,
                            "logprobs": logprobs,
                            "finish_reason": seq.finish_reason,
                            "stop_reason": seq.stop_reason,
                        }
                    )
                if choices:
                    yield self.chunk(choices, self.usage() if continuous else None)
            if options is not None and options.include_usage:
                yield self.chunk([], self.usage())
        except EngineDeadError as exc:
            yield sse_event(error_body(f"the engine died: {exc}", 500))
        except ApiError as exc:
            yield sse_event(exc.body())
        yield SSE_DONE


async def _firsts(streams: Sequence[RequestStream]) -> list[RequestDelta]:
    return [await s.get() for s in streams]


async def _collect(work: _Completion, streams: Sequence[RequestStream]) -> None:
    for state, stream in zip(work.states, streams, strict=True):
        while not stream.done:
            state.apply(await stream.get())


async def create_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), CompletionRequest)
    state.check_model(req.model)
    if req.suffix is not None:
        raise ApiError("suffix is not supported", 400, param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(
            f"best_of={req.best_of} is invalid; accepted: unset or equal to n={req.n}",
            400,
            param="best_of",
        )
    state.check_alive()
    work = _Completion(state, req)
    client = state.client
    streams: list[RequestStream] = []
    streaming = False
    try:
        for rid, (_, ids), sampling in zip(
            work.request_ids, work.prompts, work.samplings, strict=True
        ):
            streams.append(client.add_request(rid, ids, sampling))
        # Wait for each request's first output before answering, so a request the
        # engine refuses still gets its 400 rather than a broken event stream.
        firsts = await until_disconnect(request, _firsts(streams))
        if req.stream:
            streaming = True
            return SSEResponse(
                work.stream(streams, firsts), on_close=lambda: client.abort(work.request_ids)
            )
        for st, first in zip(work.states, firsts, strict=True):
            st.apply(first)
        await until_disconnect(request, _collect(work, streams))
        return JSONResponse(work.response())
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening
    except EngineDeadError as exc:
        raise ApiError(f"the engine died: {exc}", 500) from None
    finally:
        if not streaming:
            client.abort(work.request_ids)
