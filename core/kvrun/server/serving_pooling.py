"""The pooling routes, as vLLM serves them: /v1/embeddings, /pooling, /score, /rerank.

They run on a pooling server (``kvrun serve --runner pooling``) and, beside generation,
on a generating one (``/classify`` needs a classifier). Each input becomes one pooling
request that shares the engine's scheduler and steps with every other request; the
answer waits for all of them (these routes do not stream). Scores and reranks of an
embedding model are the cosine similarities of the embeddings, as in vLLM. A request whose
``model`` names a LoRA adapter (``--enable-lora``) pools the adapted model's hidden states.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.errors import RequestError
from kvrun.pooling import PoolingParams, cosine
from kvrun.server.errors import ApiError, EngineDeadError
from kvrun.server.params import api_error, check_prompt, check_text_size
from kvrun.server.protocol import _Strict, parse_body
from kvrun.server.state import ServerState
from kvrun.server.streaming import ClientDisconnected, until_disconnect
from kvrun.server.wire import WirePooling

__all__ = [
    "create_classify",
    "create_embeddings",
    "create_pooling",
    "create_rerank",
    "create_score",
]

Inputs = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    add_special_tokens: bool = True
    user: str | None = None


class ClassifyRequest(_Strict):
    model: str | None = None
    input: Inputs
    add_special_tokens: bool = True
    user: str | None = None


class ScoreRequest(_Strict):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    add_special_tokens: bool = True
    user: str | None = None


class RerankRequest(_Strict):
    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = None
    return_documents: bool = True
    add_special_tokens: bool = True
    user: str | None = None


def _inputs(value: Inputs, param: str) -> list[str | list[int]]:
    """One prompt per input: a text, a list of texts, token ids or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise ApiError(f"{param} is empty; accepted: a text, texts or token ids", 400, param=param)
    if all(isinstance(v, int) for v in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


async def _pool(
    state: ServerState,
    request: Request,
    prompts: Sequence[str | list[int]],
    params: PoolingParams,
    param: str,
    add_special_tokens: bool,
    model: str | None,
) -> tuple[list[torch.Tensor], int]:
    """Each prompt's pooled vector (``model``: the request's, which may name a LoRA
    adapter) and the prompt tokens they took in all."""
    limit = state.config.limits.max_sequences
    if len(prompts) > limit:
        raise ApiError(
            f"{param} has {len(prompts)} inputs; accepted: at most {limit} in one request "
            "(--max-sequences-per-request)",
            400,
            param=param,
        )
    state.check_alive()
    token_ids: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            check_text_size(prompt, param, state.info, state.tokenizer.max_token_chars)
            ids = await asyncio.to_thread(
                state.tokenizer.encode, prompt, add_special_tokens=add_special_tokens
            )
        else:
            ids = prompt
        check_prompt(ids, state.info, param)
        token_ids.append(ids)
    wire = WirePooling(dimensions=params.dimensions, normalize=params.normalize, task=params.task)
    base = uuid.uuid4().hex
    ids_sent = [f"pool-{base}-{i}" for i in range(len(token_ids))]
    client = state.client
    lora_name = state.lora_for(model)
    try:
        streams = [
            client.add_pooling_request(rid, ids, wire, lora_name)
            for rid, ids in zip(ids_sent, token_ids, strict=True)
        ]

        async def collect() -> list[torch.Tensor]:
            out = []
            for stream in streams:
                delta = await stream.get()
                if delta.pooled is None:  # ended by the server (shutting down)
                    raise ApiError("the request was aborted: the server is shutting down", 503)
                out.append(torch.tensor(delta.pooled, dtype=torch.float32))
            return out

        vectors = await until_disconnect(request, collect())
    except EngineDeadError as exc:
        raise ApiError(f"the engine died: {exc}", 500) from None
    finally:
        client.abort(ids_sent)
    return vectors, sum(len(ids) for ids in token_ids)


def _params(dimensions: int | None, task: str) -> PoolingParams:
    try:
        return PoolingParams(dimensions=dimensions, task=task)
    except RequestError as exc:
        raise api_error(exc) from None


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _envelope(
    state: ServerState, model: str | None, prefix: str, tokens: int, **body: Any
) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": state.lora_for(model) or state.info.model_name,
        **body,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _answer(request: Request, work: Any) -> Response:
    try:
        return JSONResponse(await work)
    except ClientDisconnected:
        return Response(status_code=499)


async def _vectors(
    state: ServerState, request: Request, task: str, item: tuple[str, str], prefix: str
) -> Response:
    """/v1/embeddings and /pooling: one vector per input, as ``{"object": item[0],
    item[1]: vector}`` entries."""
    req = parse_body(await request.body(), EmbeddingRequest)
    state.check_model(req.model)
    kind, key = item

    async def work() -> dict[str, Any]:
        prompts = _inputs(req.input, "input")
        params = _params(req.dimensions, task)
        vectors, tokens = await _pool(
            state, request, prompts, params, "input", req.add_special_tokens, req.model
        )
        data = [
            {"object": kind, key: _encode(v, req.encoding_format), "index": i}
            for i, v in enumerate(vectors)
        ]
        return _envelope(state, req.model, prefix, tokens, data=data)

    return await _answer(request, work())


async def create_embeddings(state: ServerState, request: Request) -> Response:
    return await _vectors(state, request, "embed", ("embedding", "embedding"), "embd")


async def create_pooling(state: ServerState, request: Request) -> Response:
    return await _vectors(state, request, "encode", ("pooling", "data"), "pool")


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    firsts = [text_1] if isinstance(text_1, str) else text_1
    seconds = [text_2] if isinstance(text_2, str) else text_2
    if not firsts or not seconds:
        raise ApiError("text_1 and text_2 need at least one text each", 400, param="text_1")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ApiError(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}; accepted: one text_1 "
            "for every text_2, or as many of each",
            400,
            param="text_1",
        )
    return list(zip(firsts, seconds, strict=True))


async def _scores(
    state: ServerState,
    request: Request,
    pairs: list[tuple[str, str]],
    add_special: bool,
    model: str | None,
) -> tuple[list[float], int]:
    unique = list(dict.fromkeys(text for pair in pairs for text in pair))
    vectors, tokens = await _pool(
        state, request, unique, _params(None, "score"), "text_1", add_special, model
    )
    by_text = dict(zip(unique, vectors, strict=True))
    return [cosine(by_text[a], by_text[b]) for a, b in pairs], tokens


async def create_score(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ScoreRequest)
    state.check_model(req.model)

    async def work() -> dict[str, Any]:
        scores, tokens = await _scores(
            state, request, _pairs(req.text_1, req.text_2), req.add_special_tokens, req.model
        )
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return _envelope(state, req.model, "score", tokens, data=data)

    return await _answer(request, work())


async def create_rerank(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), RerankRequest)
    state.check_model(req.model)
    if req.top_n is not None and req.top_n < 1:
        raise ApiError(f"top_n={req.top_n} is invalid; accepted: an int >= 1", 400, param="top_n")

    async def work() -> dict[str, Any]:
        pairs = [(req.query, doc) for doc in req.documents]
        scores, tokens = await _scores(state, request, pairs, req.add_special_tokens, req.model)
        order = np.argsort([-s for s in scores], kind="stable")[: req.top_n]
        results = []
        for i in order.tolist():
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                item["document"] = {"text": req.documents[i]}
            results.append(item)
        body = _envelope(state, req.model, "rerank", tokens, results=results)
        del body["object"], body["created"]
        body["usage"] = {"total_tokens": tokens}
        return body

    return await _answer(request, work())


async def create_classify(state: ServerState, request: Request) -> Response:
    req = parse_body(await request.body(), ClassifyRequest)
    state.check_model(req.model)

    async def work() -> dict[str, Any]:
        prompts = _inputs(req.input, "input")
        probs, tokens = await _pool(
            state,
            request,
            prompts,
            _params(None, "classify"),
            "input",
            req.add_special_tokens,
            req.model,
        )
        labels = state.info.id2label
        data = []
        for i, p in enumerate(probs):
            best = int(p.argmax())
            label = labels[best] if best < len(labels) else f"LABEL_{best}"
            data.append({"index": i, "label": label, "probs": p.tolist(), "num_classes": len(p)})
        return _envelope(state, req.model, "classify", tokens, data=data)

    return await _answer(request, work())
