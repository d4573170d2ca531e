"""From a validated request body to the engine's sampling fields, checking every range.

Each check names the request field (``param``) and what is accepted, so a client
sees OpenAI's 400 envelope instead of an engine-side error. Caps that protect the
server (n, stop strings) come from :class:`ServerLimits`; those that need the model
(vocabulary, context length, logprobs) from the engine's :class:`EngineInfo`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvrun.server.errors import ApiError
from kvrun.server.protocol import ChatCompletionRequest, CompletionRequest
from kvrun.server.wire import EngineInfo, WireSampling

__all__ = ["SamplingChoice", "ServerLimits", "build_sampling", "check_prompt", "resolve_max_tokens"]

_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class ServerLimits:
    """Per-request caps the server enforces (--max-n, --max-stop-strings, ...)."""

    max_n: int = 16  # sequences per prompt
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256


@dataclass(frozen=True)
class SamplingChoice:
    """How the route asks for logprobs: the count and the field that carried it."""

    logprobs: int | None  # candidates per generated position; None: no logprobs
    logprobs_param: str  # "logprobs" (completions) or "top_logprobs" (chat)
    prompt_logprobs: int | None  # candidates per prompt position (echo with logprobs)


def _bad(param: str, value: object, accepted: str) -> ApiError:
    shown = repr(value) if not isinstance(value, str) else repr(value[:100])
    return ApiError(f"{param}={shown} is invalid; accepted: {accepted}", 400, param=param)


def _in_range(param: str, value: float | None, lo: float, hi: float, accepted: str) -> None:
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise _bad(param, value, accepted)


def check_prompt(token_ids: Sequence[int], info: EngineInfo, param: str) -> None:
    """A prompt must be non-empty, inside the vocabulary and shorter than the model length."""
    if not token_ids:
        raise ApiError(f"{param} is empty", 400, param=param)
    bad = next((t for t in token_ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise ApiError(
            f"{param} holds token id {bad}, outside the vocabulary [0, {info.vocab_size})",
            400,
            param=param,
        )
    if len(token_ids) >= info.max_model_len:
        raise ApiError(
            f"This model's maximum context length is {info.max_model_len} tokens. However, "
            f"your {param} has {len(token_ids)} tokens, leaving no room to generate. "
            "Please reduce the length of the prompt.",
            400,
            param=param,
            code="context_length_exceeded",
        )


def resolve_max_tokens(
    requested: int | None, param: str, prompt_len: int, info: EngineInfo, default: int | None
) -> int:
    """``requested`` checked against the room left; unset: ``default`` clipped to the room."""
    room = info.max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise _bad(param, requested, "an int >= 1")
    if requested > room:
        raise ApiError(
            f"This model's maximum context length is {info.max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the messages/prompt, "
            f"{requested} in {param}). Please reduce the length of the prompt or {param}.",
            400,
            param=param,
            code="context_length_exceeded",
        )
    return requested


def _check_token_ids(param: str, ids: list[int] | None, vocab: int) -> None:
    bad = next((t for t in ids or () if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad(param, bad, f"token ids in [0, {vocab})")


def _check_stop(stop: str | list[str] | None, limits: ServerLimits) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > limits.max_stop_strings:
        raise _bad(
            "stop",
            f"<{len(stops)} strings>",
            f"at most {limits.max_stop_strings} stop strings (--max-stop-strings)",
        )
    for s in stops:
        if not s:
            raise _bad("stop", s, "non-empty strings")
        if len(s) > limits.max_stop_string_chars:
            raise _bad(
                "stop",
                s,
                f"strings of at most {limits.max_stop_string_chars} characters "
                "(--max-stop-string-chars)",
            )
    return stops


def _check_logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if key.strip().isdigit() else -1
        if not 0 <= token < vocab:
            raise _bad("logit_bias", key, f"keys that are token ids in [0, {vocab})")
        _in_range("logit_bias", value, -100.0, 100.0, "values in [-100, 100]")
        out[token] = value
    return out


def build_sampling(
    req: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int,
    choice: SamplingChoice,
    limits: ServerLimits,
    info: EngineInfo,
) -> WireSampling:
    """The request's sampling fields, each checked; unset ones keep the engine's defaults."""
    if not 1 <= req.n <= limits.max_n:
        raise _bad("n", req.n, f"an int in [1, {limits.max_n}] (--max-n)")
    _in_range("temperature", req.temperature, 0.0, math.inf, "a float >= 0")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
        raise _bad("top_p", req.top_p, "a float in (0, 1]")
    if req.top_k is not None and req.top_k < -1:
        raise _bad("top_k", req.top_k, "an int >= 1, or 0 or -1 to disable")
    _in_range("min_p", req.min_p, 0.0, 1.0, "a float in [0, 1]")
    _in_range("presence_penalty", req.presence_penalty, -2.0, 2.0, "a float in [-2, 2]")
    _in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0, "a float in [-2, 2]")
    if req.repetition_penalty is not None and not (
        math.isfinite(req.repetition_penalty) and req.repetition_penalty > 0
    ):
        raise _bad("repetition_penalty", req.repetition_penalty, "a float > 0")
    if req.seed is not None and not _INT64[0] <= req.seed <= _INT64[1]:
        raise _bad("seed", req.seed, "a 64-bit signed int")
    if not 0 <= req.min_tokens <= max_tokens:
        raise _bad("min_tokens", req.min_tokens, f"an int in [0, max_tokens={max_tokens}]")
    cap = f"an int in [0, {info.max_logprobs}] (--max-logprobs)"
    if choice.logprobs is not None and not 0 <= choice.logprobs <= info.max_logprobs:
        raise _bad(choice.logprobs_param, choice.logprobs, cap)
    if choice.prompt_logprobs is not None and not 0 <= choice.prompt_logprobs <= info.max_logprobs:
        raise _bad("prompt_logprobs", choice.prompt_logprobs, cap)
    stops = _check_stop(req.stop, limits)
    _check_token_ids("stop_token_ids", req.stop_token_ids, info.vocab_size)
    _check_token_ids("allowed_token_ids", req.allowed_token_ids, info.vocab_size)
    if req.allowed_token_ids is not None and not req.allowed_token_ids:
        raise _bad("allowed_token_ids", [], "a non-empty list of token ids")
    bias = _check_logit_bias(req.logit_bias, info.vocab_size)
    if req.bad_words is not None and not all(req.bad_words):
        raise _bad("bad_words", req.bad_words, "non-empty strings")

    sampling = WireSampling(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
    )
    optional: dict[str, object] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "stop": stops,
        "stop_token_ids": req.stop_token_ids,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": bias,
        "allowed_token_ids": req.allowed_token_ids,
        "bad_words": req.bad_words,
        "logprobs": choice.logprobs,
        "prompt_logprobs": choice.prompt_logprobs,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(sampling, name, value)
    return sampling
