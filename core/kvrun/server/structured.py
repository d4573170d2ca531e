"""A request's output constraint, from whichever field carried it, checked before it is queued.

The OpenAI field ``response_format`` (``json_object``, ``json_schema``, and vLLM's
``structural_tag``), vLLM's ``structured_outputs`` object and its older ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar`` fields all become one
:class:`~kvrun.structured_output.StructuredOutputsParams`. At most one of them may be
given. The constraint is compiled to a grammar here (in a worker thread, with a time
bound) so that a bad schema, regex or grammar is a 400 naming the field the client used,
before the engine sees the request; the engine compiles it against the vocabulary.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvrun.errors import RequestError
from kvrun.server.errors import ApiError
from kvrun.server.params import api_error
from kvrun.server.protocol import ChatCompletionRequest, CompletionRequest
from kvrun.structured_output import StructuredOutputsParams
from kvrun.structured_output.compiler import BACKENDS, check_constraint

__all__ = ["CHECK_TIMEOUT_S", "read_constraint"]

# How long the frontend may spend turning one request's constraint into a grammar.
CHECK_TIMEOUT_S = 10.0

_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_RESPONSE_FORMATS = "text, json_object, json_schema, structural_tag"


def _response_format(value: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format as StructuredOutputsParams keywords; None for plain text."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(
                "response_format of type json_schema needs a json_schema object "
                "({'name': ..., 'schema': {...}})",
                400,
                param="response_format",
            )
        schema = spec.get("schema", {})  # OpenAI allows it absent: any JSON value
        return {"json": schema}
    if kind == "structural_tag":
        return {"structural_tag": {k: v for k, v in value.items() if k != "type"}}
    raise ApiError(
        f"response_format type {kind!r} is not supported; accepted: {_RESPONSE_FORMATS}",
        400,
        param="response_format",
    )


def _collect(req: CompletionRequest | ChatCompletionRequest) -> tuple[str, dict[str, Any]] | None:
    """The one field that constrains the output, as (its name, StructuredOutputsParams
    keywords); None when no field does."""
    found: list[tuple[str, dict[str, Any] | None]] = []
    if req.response_format is not None:
        found.append(("response_format", _response_format(req.response_format)))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", dict(req.structured_outputs)))
    for field, kind in _GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, {kind: value}))
    given = [(name, kwargs) for name, kwargs in found if kwargs is not None]
    if len(given) > 1:
        names = ", ".join(name for name, _ in given)
        raise ApiError(
            f"{names} each constrain the output; give at most one of them",
            400,
            param=given[1][0],
        )
    if not given:
        return None
    name, kwargs = given[0]
    if req.guided_whitespace_pattern is not None:
        kwargs["whitespace_pattern"] = req.guided_whitespace_pattern
    return name, kwargs


def _check_backend(req: CompletionRequest | ChatCompletionRequest, running: str) -> None:
    """A request may name the backend the engine runs (or auto), not pick another."""
    backend = req.guided_decoding_backend
    if backend is not None and backend not in ("auto", running):
        known = "" if backend in BACKENDS else f" ({backend!r} is not a backend kvrun has)"
        raise ApiError(
            f"guided_decoding_backend {backend!r} is not the server's{known}; accepted: auto "
            f"or {running} (choose another with --structured-outputs-config at start)",
            400,
            param="guided_decoding_backend",
        )


def _params(field: str, kwargs: dict[str, Any]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except TypeError:  # an unknown key in the structured_outputs object
        known = ", ".join(StructuredOutputsParams.__dataclass_fields__)
        unknown = sorted(set(kwargs) - set(StructuredOutputsParams.__dataclass_fields__))
        raise ApiError(
            f"{field} has the unknown key {unknown[0]!r}; accepted keys: {known}",
            400,
            param=field,
        ) from None
    except RequestError as exc:
        raise _renamed(exc, field) from None


def _renamed(exc: RequestError, field: str) -> ApiError:
    """The refusal, naming the field the client used (response_format, guided_json); param
    is that top-level field, as OpenAI reports it (the message keeps the key inside it)."""
    if field != "structured_outputs":
        return api_error(exc.renamed(field))
    return ApiError(str(exc), 400, param=field, code=exc.code)


async def read_constraint(
    req: CompletionRequest | ChatCompletionRequest, backend: str
) -> StructuredOutputsParams | None:
    """The request's output constraint, checked for the engine's ``backend`` (a 400
    naming the field when it is not one)."""
    _check_backend(req, backend)
    found = _collect(req)
    if found is None:
        if req.guided_whitespace_pattern is not None:
            raise ApiError(
                "guided_whitespace_pattern applies only with a JSON constraint "
                "(response_format, structured_outputs or guided_json)",
                400,
                param="guided_whitespace_pattern",
            )
        return None
    field, kwargs = found
    params = _params(field, kwargs)
    try:
        await asyncio.wait_for(
            asyncio.to_thread(check_constraint, params, backend), CHECK_TIMEOUT_S
        )
    except RequestError as exc:
        raise _renamed(exc, field) from None
    except TimeoutError:
        raise ApiError(
            f"{field} did not compile to a grammar within {CHECK_TIMEOUT_S:.0f} s; "
            "accepted: a smaller schema, regex or grammar",
            400,
            param=field,
        ) from None
    return params
