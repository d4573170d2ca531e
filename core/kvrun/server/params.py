"""From a validated request body to the engine's sampling fields.

Every field is checked by the core's one validation path
(:class:`~kvrun.sampling_params.SamplingParams`, its ``verify``, and
:mod:`kvrun.validation`), the same code the engine runs on the request again; a
refusal becomes OpenAI's 400 envelope naming the field as the route spells it
(``top_logprobs`` on chat, ``max_completion_tokens``, ``messages``). Only the caps
that protect the server itself (n, stop strings; the body size is the transport's)
are checked here, from :class:`ServerLimits`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvrun import validation
from kvrun.errors import RequestError
from kvrun.sampling_params import SamplingParams
from kvrun.server.errors import ApiError
from kvrun.server.protocol import ChatCompletionRequest, CompletionRequest
from kvrun.server.wire import EngineInfo, WireSampling, WireStructuredOutputs
from kvrun.structured_output import StructuredOutputsParams

__all__ = [
    "SamplingChoice",
    "ServerLimits",
    "api_error",
    "build_sampling",
    "check_caps",
    "check_prompt",
    "check_text_size",
    "resolve_max_tokens",
]


@dataclass(frozen=True)
class ServerLimits:
    """Per-request caps the server enforces (--max-n, --max-stop-strings, ...)."""

    max_n: int = 16  # sequences per prompt
    max_sequences: int = 256  # prompts x n in one request
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256


@dataclass(frozen=True)
class SamplingChoice:
    """How the route asks for logprobs: the count and the field that carried it."""

    logprobs: int | None  # candidates per generated position; None: no logprobs
    logprobs_param: str  # "logprobs" (completions) or "top_logprobs" (chat)
    prompt_logprobs: int | None  # candidates per prompt position (echo with logprobs)


def api_error(exc: RequestError, names: Mapping[str, str] | None = None) -> ApiError:
    """The 400 for a refusal; ``names`` maps core field names to the route's."""
    if exc.param is not None and names and exc.param in names:
        exc = exc.renamed(names[exc.param])
    return ApiError(str(exc), 400, param=exc.param, code=exc.code)


def _cap(param: str, value: object, accepted: str) -> ApiError:
    return api_error(RequestError.invalid(param, value, accepted))


# A text longer than this many times (max_model_len x the longest token) cannot fit in
# max_model_len tokens even after Unicode normalisation; it is refused untokenized.
TEXT_SIZE_FACTOR = 4


def check_text_size(text: str, param: str, info: EngineInfo, max_token_chars: int) -> None:
    """A 400 for a text too long to be a prompt, before any time goes into tokenizing it."""
    limit = TEXT_SIZE_FACTOR * info.max_model_len * max_token_chars
    if len(text) > limit:
        raise ApiError(
            f"{param} has {len(text)} characters, more than any text of max_model_len="
            f"{info.max_model_len} tokens can have ({limit}); shorten it",
            400,
            param=param,
            code="context_length_exceeded",
        )


def check_prompt(token_ids: Sequence[int], info: EngineInfo, param: str) -> None:
    """kvrun.validation.check_prompt, answered as a 400 naming ``param``."""
    try:
        validation.check_prompt(
            token_ids, vocab_size=info.vocab_size, max_model_len=info.max_model_len, param=param
        )
    except RequestError as exc:
        raise api_error(exc) from None


def resolve_max_tokens(
    requested: int | None, param: str, prompt_len: int, info: EngineInfo, default: int | None
) -> int:
    """kvrun.validation.resolve_max_tokens, answered as a 400 naming ``param``."""
    try:
        return validation.resolve_max_tokens(
            requested,
            prompt_len=prompt_len,
            max_model_len=info.max_model_len,
            param=param,
            default=default,
        )
    except RequestError as exc:
        raise api_error(exc) from None


def check_caps(
    req: CompletionRequest | ChatCompletionRequest, limits: ServerLimits, num_prompts: int = 1
) -> None:
    """The server's own caps, how much one request may ask of it: checked first, before
    anything is tokenized, rendered or built per sequence."""
    if not 1 <= req.n <= limits.max_n:
        raise _cap("n", req.n, f"an int in [1, {limits.max_n}] (--max-n)")
    if num_prompts * req.n > limits.max_sequences:
        raise api_error(
            RequestError(
                f"{num_prompts} prompts x n={req.n} is {num_prompts * req.n} sequences; "
                f"accepted: at most {limits.max_sequences} in one request "
                "(--max-sequences-per-request)",
                param="n",
            )
        )
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > limits.max_stop_strings:
        raise _cap(
            "stop",
            f"<{len(stops)} strings>",
            f"at most {limits.max_stop_strings} stop strings (--max-stop-strings)",
        )
    for stop in stops:
        if len(stop) > limits.max_stop_string_chars:
            raise _cap(
                "stop",
                stop,
                f"strings of at most {limits.max_stop_string_chars} characters "
                "(--max-stop-string-chars)",
            )


def build_sampling(
    req: CompletionRequest | ChatCompletionRequest,
    *,
    max_tokens: int | None,
    choice: SamplingChoice,
    info: EngineInfo,
    structured_outputs: StructuredOutputsParams | None = None,
) -> WireSampling:
    """The request's sampling fields, checked as the engine will check them; unset ones
    keep SamplingParams' defaults. The route has run :func:`check_caps` already (once per
    request, before any prompt was rendered or tokenized)."""
    fields: dict[str, object] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
    }
    optional: dict[str, object] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": req.logit_bias,
        "allowed_token_ids": req.allowed_token_ids,
        "bad_words": req.bad_words,
        "logprobs": choice.logprobs,
        "prompt_logprobs": choice.prompt_logprobs,
    }
    fields.update((name, value) for name, value in optional.items() if value is not None)
    try:
        params = SamplingParams(**fields)  # type: ignore[arg-type]
        params.verify(info.vocab_size, info.max_logprobs)
    except RequestError as exc:
        raise api_error(exc, {"logprobs": choice.logprobs_param}) from None
    # What travels is what the request set, normalised (stop as a list, bias keys as ints).
    wire = WireSampling(**{name: getattr(params, name) for name in fields})
    if structured_outputs is not None:
        so = structured_outputs
        wire.structured_outputs = WireStructuredOutputs(
            **{name: getattr(so, name) for name in WireStructuredOutputs.__struct_fields__}
        )
    return wire
