"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) to text."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kvrun.server.beam_search import answer_with_beams, beam_search_params, check_beam_fields
from kvrun.server.deltas import SequenceState
from kvrun.server.engine_client import RequestStream
from kvrun.server.errors import ApiError, EngineDeadError
from kvrun.server.logprobs import completion_logprobs
from kvrun.server.params import (
    SamplingChoice,
    build_sampling,
    check_caps,
    check_prompt,
    check_text_size,
    resolve_max_tokens,
)
from kvrun.server.protocol import CompletionRequest, parse_body
from kvrun.server.serving_base import GenerationCall, stream_error
from kvrun.server.state import ServerState
from kvrun.server.streaming import SSE_DONE, merged
from kvrun.server.structured import read_constraint
from kvrun.server.wire import RequestDelta
from kvrun.structured_output import StructuredOutputsParams

__all__ = ["create_completion"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _prompts(req: CompletionRequest, state: ServerState) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; text is decoded from ids for token prompts (echo).

    Runs in a worker thread (tokenizing a long text takes a while); a text too long to
    be a prompt is refused before it is tokenized."""
    prompt = req.prompt
    tok = state.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError("prompt is empty", 400, param="prompt")
    if all(isinstance(p, str) for p in prompt):
        texts: list[str] = prompt  # type: ignore[assignment]
        for text in texts:
            check_text_size(text, "prompt", state.info, tok.max_token_chars)
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


class _Completion(GenerationCall):
    """One /v1/completions call: its parsed request, prompts and engine requests."""

    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        prompts: list[tuple[str, list[int]]],
        constraint: StructuredOutputsParams | None,
    ) -> None:
        call_id = f"cmpl-{uuid.uuid4().hex}"
        self.prompts = prompts
        super().__init__(
            state,
            call_id=call_id,
            object_name="text_completion",
            chunk_object_name="text_completion",
            stream_options=req.stream_options,
            n=req.n,
            prompt_ids=[ids for _, ids in self.prompts],
            request_ids=[f"{call_id}-{i}" for i in range(len(self.prompts))],
            model=req.model,
        )
        self.req = req
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
                    info=state.info,
                    structured_outputs=constraint,
                )
            )

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
        return self.envelope(choices)

    async def stream(
        self, streams: Sequence[RequestStream], firsts: Sequence[RequestDelta]
    ) -> AsyncIterator[bytes]:
        sent_tokens: dict[tuple[int, int], int] = {}
        offsets: dict[tuple[int, int], int] = {}
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
                    if key not in sent_tokens:
                        sent_tokens[key] = offsets[key] = 0
                        if self.req.echo:
                            prefix = self.prompts[i][0]
                            if num is not None:
                                logprobs = self._echo_logprobs(i, num)
                                offsets[key] = sum(len(t) for t in logprobs["tokens"])
                    text = completion.text
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
                    yield self.chunk(choices, self.chunk_usage())
            if self.include_usage:
                yield self.chunk([], self.usage())
        except (EngineDeadError, ApiError) as exc:
            yield stream_error(exc)
        yield SSE_DONE


async def create_completion(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), CompletionRequest)
    state.check_model(req.model)
    if req.suffix is not None:
        raise ApiError("suffix is not supported", 400, param="suffix")
    check_beam_fields(req)
    if not req.use_beam_search and req.best_of is not None and req.best_of != req.n:
        raise ApiError(
            f"best_of={req.best_of} is invalid; accepted: unset or equal to n={req.n}",
            400,
            param="best_of",
        )
    # Caps before anything is tokenized or built per sequence (n=10^9 must cost nothing).
    prompt = req.prompt
    single = isinstance(prompt, str) or (bool(prompt) and all(isinstance(p, int) for p in prompt))
    check_caps(req, state.config.limits, 1 if single else len(prompt))
    constraint = await read_constraint(req, state.info.structured_outputs_backend)
    state.check_alive()
    prompts = await asyncio.to_thread(_prompts, req, state)
    work = _Completion(state, req, prompts, constraint)
    if req.use_beam_search:
        max_tokens = min(s.max_tokens for s in work.samplings if isinstance(s.max_tokens, int))
        params = beam_search_params(req, max_tokens, work.prompt_ids, state.info)
        skip = req.skip_special_tokens
        return await answer_with_beams(work, request, params, skip_special_tokens=skip)
    return await work.answer(request, work.samplings, req.stream)
