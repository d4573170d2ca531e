"""``use_beam_search`` on /v1/completions, as vLLM serves it: the ``n`` best beams of a
search of width ``max(n, best_of)``, as ``n`` choices.

The frontend drives the search (:class:`kvrun.beam_search.BeamSearch`, the same rule as
the offline :meth:`kvrun.LLM.beam_search`): each step it sends the engine one ordinary
single-token request per running beam of every prompt (``max_tokens=1``,
``logprobs=2 * beam_width``) and waits for their candidates. The engine needs no new
message or request kind, a step's beams are batched in the engine like any concurrent
requests, and they share their prompt's KV blocks through the prefix cache. The
answer is not streamed (vLLM does not stream beams either): ``stream`` is a 400. A
request whose ``model`` names a LoRA adapter sends every beam's request with it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.beam_search import BeamSearch, BeamSearchSequence, check_beam_search, sequence_text
from kvrun.errors import RequestError
from kvrun.outputs import Logprob
from kvrun.sampling_params import BeamSearchParams
from kvrun.server.deltas import RequestState, to_entries
from kvrun.server.engine_client import EngineClient, RequestStream
from kvrun.server.errors import ApiError, EngineDeadError
from kvrun.server.params import api_error
from kvrun.server.protocol import ChatCompletionRequest, CompletionRequest
from kvrun.server.serving_base import GenerationCall
from kvrun.server.streaming import ClientDisconnected, until_disconnect
from kvrun.server.wire import EngineInfo, WireSampling

if TYPE_CHECKING:
    from kvrun.tokenizer import Tokenizer

__all__ = [
    "answer_with_beams",
    "beam_search_params",
    "check_beam_fields",
    "fill_states",
    "run_beam_search",
]

# Request fields that would change which text a beam search returns, and that it does not
# apply (vLLM ignores them silently; here they are refused, as unknown fields are).
_NOT_WITH_BEAMS: dict[str, object] = {
    "stream": False,
    "stop": None,
    "stop_token_ids": None,
    "bad_words": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "repetition_penalty": None,
    "min_tokens": 0,
    "prompt_logprobs": None,
    "response_format": None,
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "tools": None,  # chat
}


def check_beam_fields(req: CompletionRequest | ChatCompletionRequest) -> None:
    """A beam-search field without use_beam_search is a 400 (it would change nothing)."""
    if not req.use_beam_search and req.length_penalty != 1.0:
        raise ApiError(
            f"length_penalty={req.length_penalty} is invalid without use_beam_search; "
            "accepted: unset, or use_beam_search=true",
            400,
            param="length_penalty",
        )


def beam_search_params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    prompts: list[list[int]],
    info: EngineInfo,
) -> BeamSearchParams:
    """The search a ``use_beam_search`` request asks for, checked; a 400 names the field."""
    for name, default in _NOT_WITH_BEAMS.items():
        value = getattr(req, name, default)
        if value != default and value not in ([], {}):
            raise ApiError(
                f"{name} is not supported with use_beam_search (beam search ranks the "
                f"model's own logprobs{'; its answer is not streamed' if name == 'stream' else ''})"
                f"; accepted: {name} unset",
                400,
                param=name,
            )
    asked_best_of = req.best_of if isinstance(req, CompletionRequest) else None
    best_of = asked_best_of if asked_best_of is not None else req.n
    if best_of < req.n:
        raise ApiError(
            f"best_of={best_of} is invalid; accepted: an int >= n={req.n} (the beam width)",
            400,
            param="best_of",
        )
    width_field = "best_of" if asked_best_of is not None else "n"
    try:
        params = BeamSearchParams(
            beam_width=best_of,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            temperature=req.temperature if req.temperature is not None else 0.0,
            length_penalty=req.length_penalty,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
        check_beam_search(
            prompts,
            params,
            vocab_size=info.vocab_size,
            max_model_len=info.max_model_len,
            max_logprobs=info.max_logprobs,
        )
    except RequestError as exc:
        raise api_error(exc, {"beam_width": width_field}) from None
    return params


async def run_beam_search(
    client: EngineClient,
    call_id: str,
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: frozenset[int],
    lora_name: str | None = None,
) -> list[list[BeamSearchSequence]]:
    """Each prompt's ``beam_width`` best sequences, best first, on the base model or the
    loaded adapter ``lora_name``; what is unfinished when this ends early (client gone,
    engine dead) is aborted."""
    searches = [BeamSearch(ids, params, eos_token_ids) for ids in prompts]
    sampling = WireSampling(
        max_tokens=1,
        temperature=params.temperature,
        logprobs=2 * params.beam_width,
        ignore_eos=True,  # the search decides what EOS means
    )
    step = 0
    live: list[str] = []
    try:
        while True:
            live, keys, streams = [], [], []
            for s, search in enumerate(searches):
                for b, tokens in enumerate(search.pending()):
                    request_id = f"{call_id}-{s}-beam{step}.{b}"
                    streams.append(client.add_request(request_id, tokens, sampling, lora_name))
                    live.append(request_id)
                    keys.append((s, b))
            if not streams:
                break
            found = dict(zip(keys, await asyncio.gather(*map(_candidates, streams)), strict=True))
            for s, search in enumerate(searches):
                if not search.done:
                    search.advance([found[(s, b)] for b in range(len(search.running))])
            step += 1
    finally:
        client.abort(live)  # only those still unfinished
    return [search.result() for search in searches]


async def _candidates(stream: RequestStream) -> dict[int, Logprob]:
    """The next-token candidates of a single-token request."""
    found: dict[int, Logprob] | None = None
    while not stream.done:
        delta = await stream.get()
        for completion in delta.completions:
            if completion.logprobs:
                found = {
                    e.token_id: Logprob(e.logprob, e.rank, e.decoded)
                    for e in completion.logprobs[-1]
                }
    if found is None:
        raise ApiError("the engine ended a beam search step without its logprobs", 500)
    return found


def fill_states(
    states: list[RequestState],
    results: list[list[BeamSearchSequence]],
    params: BeamSearchParams,
    tokenizer: Tokenizer,
    *,
    skip_special_tokens: bool,
) -> None:
    """Each prompt's ``n`` best beams as its sequences, as if the engine had made them."""
    for state, beams in zip(states, results, strict=True):
        for seq, beam in zip(state.sequences, beams):
            seq.token_ids = beam.generated_token_ids
            seq.text_parts = [
                sequence_text(
                    tokenizer,
                    beam,
                    params,
                    with_prompt=False,
                    skip_special_tokens=skip_special_tokens,
                )
            ]
            seq.logprobs = [to_entries(position) for position in beam.logprobs]
            seq.cumulative_logprob = beam.cum_logprob
            seq.finish_reason = beam.finish_reason
            seq.stop_reason = beam.stop_reason


async def answer_with_beams(
    call: GenerationCall, request: Request, params: BeamSearchParams, *, skip_special_tokens: bool
) -> Response:
    """Run the search for the call's prompts and answer with its ``n`` best beams each."""
    state = call.state
    try:
        results = await until_disconnect(
            request,
            run_beam_search(
                state.client,
                call.id,
                call.prompt_ids,
                params,
                state.tokenizer.eos_token_ids,
                call.lora_name,
            ),
        )
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening
    except EngineDeadError as exc:
        raise ApiError(f"the engine died: {exc}", 500) from None
    fill_states(
        call.states, results, params, state.tokenizer, skip_special_tokens=skip_special_tokens
    )
    return JSONResponse(call.response())
