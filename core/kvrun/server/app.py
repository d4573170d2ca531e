"""The FastAPI application: routes, error envelope, authentication and size limits.

:func:`build_app` registers routes from the configuration alone (no engine is
needed), so the set of routes can be listed, e.g. to test that every one is
guarded; :func:`attach_state` connects a running engine before serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvrun.server.auth import OPEN_PATHS, ApiKeyMiddleware
from kvrun.server.config import ServerConfig
from kvrun.server.errors import ApiError, error_body
from kvrun.server.limits import RequestLimitsMiddleware
from kvrun.server.lora import add_lora_routes
from kvrun.server.metrics import CONTENT_TYPE_LATEST
from kvrun.server.params import check_text_size
from kvrun.server.protocol import DetokenizeRequest, TokenizeRequest, parse_body
from kvrun.server.serving_chat import create_chat_completion, render_messages
from kvrun.server.serving_completion import create_completion
from kvrun.server.serving_pooling import (
    create_classify,
    create_embeddings,
    create_pooling,
    create_rerank,
    create_score,
)
from kvrun.server.state import ServerState
from kvrun.server.wire import UtilityMethod
from kvrun.version import __version__

__all__ = ["attach_state", "build_app"]

logger = logging.getLogger(__name__)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.kvrun
    return state


def attach_state(app: FastAPI, state: ServerState) -> None:
    app.state.kvrun = state


def _error(message: str, status: int, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(message, status, **kw), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error(message, exc.status_code)

    async def validation_error(request: Request, exc: Exception) -> Response:
        return _error(f"invalid request: {exc}", 400)

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _health(request: Request) -> Response:
    reason = _state(request).client.dead_summary
    if reason is not None:
        return _error(f"the engine is dead: {reason}", 503)
    return Response(status_code=200)


async def _utility(request: Request, method: UtilityMethod) -> Any:
    state = _state(request)
    state.check_alive()
    return await state.client.call(method)


def _add_openai_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state = _state(request)
        card = {
            "id": state.info.model_name,
            "object": "model",
            "created": state.started_at,
            "owned_by": "kvrun",
            "root": state.info.model_path,
            "parent": None,
            "max_model_len": state.info.max_model_len,
        }
        adapters = [
            {**card, "id": name, "root": path, "parent": state.info.model_name}
            for name, path in state.loras.items()
        ]
        return JSONResponse({"object": "list", "data": [card, *adapters]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(_state(request), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(_state(request), request)


def _add_pooling_routes(app: FastAPI) -> None:
    """Embeddings and scores (the model run with --runner pooling), as vLLM serves them."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await create_embeddings(_state(request), request)

    @app.post("/pooling")
    async def pooling(request: Request) -> Response:
        return await create_pooling(_state(request), request)

    @app.post("/score")
    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        return await create_score(_state(request), request)

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        return await create_classify(_state(request), request)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(request: Request) -> Response:
        return await create_rerank(_state(request), request)


def _add_tokenizer_routes(app: FastAPI) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        state = _state(request)
        req = parse_body(await request.body(), TokenizeRequest)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError("give exactly one of prompt and messages", 400, param="prompt")
        if req.messages is not None:
            text = await render_messages(
                state,
                req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template=req.chat_template,
                chat_template_kwargs=req.chat_template_kwargs,
            )
            add_special = False  # the template places them
            param = "messages"
        else:
            assert req.prompt is not None
            text, add_special, param = req.prompt, req.add_special_tokens, "prompt"
        # The same bound as a prompt's: /tokenize answers nothing a request could not send.
        check_text_size(text, param, state.info, state.tokenizer.max_token_chars)
        ids = await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=add_special)
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": state.info.max_model_len,
            "tokens": ids,
        }
        if req.return_token_strs:
            body["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        state = _state(request)
        req = parse_body(await request.body(), DetokenizeRequest)
        state.check_model(req.model)
        vocab = state.info.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(
                f"tokens holds token id {bad}, outside the vocabulary [0, {vocab})",
                400,
                param="tokens",
            )
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        return _health(request)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping(request: Request) -> Response:
        return _health(request)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = _state(request).metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _add_gated_routes(app: FastAPI, config: ServerConfig) -> None:
    if config.dev_mode:

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache(request: Request) -> JSONResponse:
            return JSONResponse({"reset": bool(await _utility(request, "reset_prefix_cache"))})

    if config.profiler_dir is not None:

        @app.post("/start_profile")
        async def start_profile(request: Request) -> Response:
            await _utility(request, "start_profile")
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile(request: Request) -> Response:
            await _utility(request, "stop_profile")
            return Response(status_code=200)


def build_app(config: ServerConfig) -> FastAPI:
    app = FastAPI(title="kvrun", version=__version__)
    _install_error_handlers(app)
    _add_openai_routes(app)
    _add_pooling_routes(app)
    _add_tokenizer_routes(app)
    _add_operational_routes(app)
    _add_gated_routes(app, config)
    if config.allow_runtime_lora_updating:
        add_lora_routes(app)
    # Starlette runs the last added middleware first: authentication before size limits,
    # so an unauthenticated client cannot make the server buffer a body.
    app.add_middleware(
        RequestLimitsMiddleware,
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
    )
    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, open_paths=OPEN_PATHS)
    return app
