"""Request bodies of the OpenAI-compatible routes, as strict pydantic models.

Strict: a string where a number belongs is an error, not a coercion, as OpenAI's
API does. A field kvrun does not know is a 400 naming it (a client asking for, say,
``guided_json`` must not get prose back without being told), except the few in
:data:`IGNORED_FIELDS`, which change nothing about the answer and which OpenAI's and
vLLM's clients send as a matter of course (docs/serving.md lists them).
Range checks that need the model or the server's caps live in
:mod:`kvrun.server.params`, so their errors can name the field and the cap.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvrun.server.errors import ApiError

__all__ = [
    "IGNORED_FIELDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "StreamOptions",
    "TokenizeRequest",
    "parse_body",
]


# Accepted and ignored at the top level of a request body: bookkeeping that does not
# change the answer.
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "user"})


class _Strict(BaseModel):
    # Unknown fields are kept so parse_body can name them.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class _SamplingFields(_Strict):
    """Fields completions and chat share (OpenAI's and vLLM's extensions)."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    user: str | None = None
    # vLLM's beam search (kvrun.server.beam_search): the n best of max(n, best_of) beams
    # (chat has no best_of: its width is n).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured output (kvrun.server.structured): at most one of these constrains the reply.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16, clipped to the room left
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class ChatMessage(BaseModel):
    # Lax and open: templates read fields such as name, tool_calls or reasoning_content.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template already places BOS
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # False: at most one call (tool_choice required)
    # the media processor's settings for this request's media parts, over the server's
    # --mm-processor-kwargs (kvrun.multimodal.processing checks them)
    mm_processor_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


M = TypeVar("M", bound=BaseModel)

_KIND: dict[str, str] = {
    "missing": "is required",
    "extra_forbidden": "is not accepted",
}


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list"})


def _path(loc: tuple[int | str, ...]) -> str:
    """The field path a client understands, cut where pydantic names a union branch."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_LABELS or "[" in part):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_body(body: bytes, model: type[M]) -> M:
    """Decode and validate a JSON body; ApiError 400 naming the field at fault."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}", 400) from None
    except RecursionError:
        raise ApiError(
            "the request body nests JSON arrays or objects too deeply; accepted: JSON a few "
            "hundred levels deep at most",
            400,
        ) from None
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise ApiError(f"the request body holds a value that cannot be read: {exc}", 400) from None
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}", 400)
    try:  # JSON's \ud800-style escapes can spell lone surrogates, which are not text
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            f"the request body holds a string that is not valid Unicode ({exc.reason}: "
            f"{exc.object[exc.start : exc.end]!r}); accepted: text without lone surrogates",
            400,
        ) from None
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = tuple(first["loc"])
        # param is the top-level field, as OpenAI reports it; the message has the full path
        param = str(loc[0]) if loc else None
        what = _KIND.get(first["type"], f"is invalid: {first['msg']}")
        got = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'))[:200]})"
        raise ApiError(f"field {_path(loc)!r} {what}{got}", 400, param=param) from None
    unknown = sorted(set(request.model_extra or {}) - IGNORED_FIELDS)
    if unknown:
        raise ApiError(
            f"field {unknown[0]!r} is not accepted: kvrun does not act on it, and ignoring it "
            "would change what was asked for; drop it (fields accepted and ignored: "
            f"{', '.join(sorted(IGNORED_FIELDS))})",
            400,
            param=unknown[0],
        )
    return request
