"""Per-request sampling parameters, shaped like vLLM's so code ports by changing an import.

Field names, defaults and accepted ranges follow vLLM's ``SamplingParams``. The object
is frozen: derive a changed copy with :meth:`SamplingParams.replace` (which validates
again) or :meth:`SamplingParams.clone`. ``__post_init__`` normalises what vLLM
normalises (a single stop string becomes a list, ``None`` lists become empty, ``top_k``
of -1 becomes 0, string keys of ``logit_bias`` from JSON become ints) and rejects bad
values with a :class:`~kvrun.errors.RequestError` naming the field, the value and what is
accepted.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from kvrun.errors import RequestError
from kvrun.outputs import RequestOutputKind
from kvrun.structured_output.params import StructuredOutputsParams

__all__ = [
    "SAMPLING_EPS",
    "BeamSearchParams",
    "LogitsProcessor",
    "SamplingParams",
    "SamplingType",
    "StructuredOutputsParams",
]

# Temperatures below this are greedy: dividing logits by them only amplifies noise.
SAMPLING_EPS = 1e-5

# vLLM v0 style: fn(output_token_ids, logits_row) -> logits_row, or
# fn(prompt_token_ids, output_token_ids, logits_row) -> logits_row; logits_row is [V].
LogitsProcessor = Callable[..., torch.Tensor]


class SamplingType(IntEnum):
    GREEDY = 0  # argmax; no randomness
    RANDOM = 1  # draws from the shared default generator
    RANDOM_SEED = 2  # draws from the request's own generator, seeded by `seed`


def _error(name: str, value: object, accepted: str) -> RequestError:
    return RequestError.invalid(name, value, accepted)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: object, accepted: str, *, lo: int | None = None) -> int:
    if not _is_int(value) or (lo is not None and value < lo):  # type: ignore[operator]
        raise _error(name, value, accepted)
    return value  # type: ignore[return-value]


def _opt_int(name: str, value: object, accepted: str, *, lo: int) -> int | None:
    return None if value is None else _int(name, value, accepted, lo=lo)


def _float(name: str, value: object, accepted: str, ok: Callable[[float], bool]) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _error(name, value, accepted)
    number = float(value)
    if not math.isfinite(number) or not ok(number):
        raise _error(name, value, accepted)
    return number


def _token_ids(name: str, value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _error(name, value, "a list of token ids (non-negative ints) or None")
    for token in value:
        _int(name, token, "a list of token ids (non-negative ints) or None", lo=0)
    return list(value)


def _strings(name: str, value: object) -> list[str]:
    accepted = "a non-empty string, a list of non-empty strings, or None"
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise _error(name, value, accepted)
    for item in items:
        if not isinstance(item, str) or not item:
            raise _error(name, value, accepted)
    return list(items)


def _logit_bias(value: object) -> dict[int, float] | None:
    accepted = "a mapping of token id (int, or its decimal string) to a bias in [-100, 100]"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _error("logit_bias", value, accepted)
    bias: dict[int, float] = {}
    for key, val in value.items():
        # OpenAI clients send JSON, whose object keys are strings: ASCII digits only
        # ("²".isdigit() is true) and short enough to be a token id.
        digits = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12
        token = int(key) if digits else key
        if not _is_int(token) or token < 0:
            raise _error("logit_bias", value, accepted)
        bias[token] = _float("logit_bias", val, accepted, lambda x: -100.0 <= x <= 100.0)
    return bias


def _processor_arity(fn: object) -> int:
    """2 or 3: how many positional arguments a logits processor takes."""
    accepted = "a list of callables taking (output_token_ids, logits) or (prompt_token_ids, output_token_ids, logits)"
    if not callable(fn):
        raise _error("logits_processors", fn, accepted)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume vLLM's common form
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    if len(positional) in (2, 3):
        return len(positional)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) and len(positional) < 2:
        return 2
    raise _error("logits_processors", fn, accepted)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and when it stops. See vLLM's SamplingParams for the fields."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, normalised to 0) disables
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]; see stop_strings
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    bad_words: list[str] | None = None  # normalised to list[str]
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until the model's max length
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens; -1: model max
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # Hold the output to a JSON schema, regex, choice or grammar (vLLM's name and type).
    structured_outputs: StructuredOutputsParams | None = None
    # What each RequestOutput holds: all so far, only the new part, or only the final one.
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # 2 or 3 per logits processor, found once here rather than on every step.
    processor_arities: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _int("n", self.n, "an int >= 1", lo=1)
        for name in ("presence_penalty", "frequency_penalty"):
            put(
                name,
                _float(name, getattr(self, name), "a float in [-2, 2]", lambda x: -2 <= x <= 2),
            )
        put(
            "repetition_penalty",
            _float("repetition_penalty", self.repetition_penalty, "a float > 0", lambda x: x > 0),
        )
        put(
            "temperature", _float("temperature", self.temperature, "a float >= 0", lambda x: x >= 0)
        )
        put("top_p", _float("top_p", self.top_p, "a float in (0, 1]", lambda x: 0 < x <= 1))
        top_k = _int("top_k", self.top_k, "an int >= 1, or 0 or -1 to disable", lo=-1)
        put("top_k", max(top_k, 0))
        put("min_p", _float("min_p", self.min_p, "a float in [0, 1]", lambda x: 0 <= x <= 1))
        if self.seed is not None and not (_is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise _error("seed", self.seed, "a 64-bit int or None")
        put("stop", _strings("stop", self.stop))
        put("stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        put("bad_words", _strings("bad_words", self.bad_words))
        max_tokens = _opt_int("max_tokens", self.max_tokens, "an int >= 1 or None", lo=1)
        min_tokens = _int("min_tokens", self.min_tokens, "an int >= 0", lo=0)
        if max_tokens is not None and min_tokens > max_tokens:
            raise _error("min_tokens", min_tokens, f"an int in [0, max_tokens={max_tokens}]")
        _opt_int("logprobs", self.logprobs, "an int >= 0 or None", lo=0)
        _opt_int("prompt_logprobs", self.prompt_logprobs, "an int >= 0 or None", lo=0)
        truncate = self.truncate_prompt_tokens
        if truncate is not None and (not _is_int(truncate) or (truncate < 1 and truncate != -1)):
            raise _error("truncate_prompt_tokens", truncate, "an int >= 1, -1, or None")
        put("logit_bias", _logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            allowed = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise _error("allowed_token_ids", allowed, "a non-empty list of token ids or None")
            put("allowed_token_ids", allowed)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise _error(
                "structured_outputs",
                self.structured_outputs,
                "a kvrun.sampling_params.StructuredOutputsParams or None",
            )
        kinds = ", ".join(f"RequestOutputKind.{k.name} ({k.value})" for k in RequestOutputKind)
        if not _is_int(self.output_kind) or self.output_kind not in set(RequestOutputKind):
            raise _error("output_kind", self.output_kind, kinds)
        put("output_kind", RequestOutputKind(self.output_kind))
        if self.stop and not self.detokenize:
            raise _error("detokenize", False, "True when stop strings are given")
        processors = self.logits_processors
        if processors is not None:
            if not isinstance(processors, list | tuple):
                raise _error("logits_processors", processors, "a list of callables or None")
            put("logits_processors", list(processors))
            put("processor_arities", tuple(_processor_arity(fn) for fn in processors))
        else:
            put("processor_arities", ())
        if self.temperature < SAMPLING_EPS:
            # Greedy ignores the truncations; neutral values keep the sampler's checks simple.
            put("top_p", 1.0)
            put("top_k", 0)
            put("min_p", 0.0)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type is SamplingType.GREEDY

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` with its normalised type, for callers type-checked strictly."""
        assert isinstance(self.stop, list)
        return self.stop

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids or ())

    def clone(self) -> SamplingParams:
        return dataclasses.replace(self)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated like a new object."""
        return dataclasses.replace(self, **changes)

    def with_generation_config(self, eos_token_ids: list[int]) -> SamplingParams:
        """A copy whose stop_token_ids also hold the generation config's extra EOS ids.

        vLLM's ``update_from_generation_config`` does this in place; a frozen object
        returns the copy instead. Nothing is added when ``ignore_eos`` is set.
        """
        if self.ignore_eos:
            return self
        current = list(self.stop_token_ids or ())
        extra = [t for t in eos_token_ids if t not in current]
        return self.replace(stop_token_ids=current + extra) if extra else self

    def verify(self, vocab_size: int, max_logprobs: int) -> None:
        """Check what needs the model: token ids inside the vocab, logprob counts under the cap."""
        ids_accepted = f"token ids in [0, {vocab_size})"
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name) or ()
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise _error(name, bad, ids_accepted)
        bad_bias = [t for t in self.logit_bias or {} if t >= vocab_size]
        if bad_bias:
            raise _error("logit_bias", bad_bias, f"keys that are {ids_accepted}")
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(self, name)
            if count is not None and count > max_logprobs:
                raise _error(name, count, f"an int in [0, {max_logprobs}] (max_logprobs) or None")


@dataclass(frozen=True, kw_only=True)
class BeamSearchParams:
    """What :meth:`kvrun.LLM.beam_search` searches for (vLLM's fields and defaults).

    ``length_penalty`` divides a finished beam's cumulative logprob by its generated
    length (EOS included) to that power, as transformers does; ``temperature`` is
    validated and passed on, but beams are ranked by the model's raw logprobs (as in
    vLLM's v1 engine), so it does not change the result.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _int("beam_width", self.beam_width, "an int >= 1", lo=1)
        _int("max_tokens", self.max_tokens, "an int >= 1", lo=1)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _error(name, getattr(self, name), "True or False")
        temperature = _float("temperature", self.temperature, "a float >= 0", lambda x: x >= 0)
        object.__setattr__(self, "temperature", temperature)
        penalty = _float("length_penalty", self.length_penalty, "a finite float", lambda x: True)
        object.__setattr__(self, "length_penalty", penalty)

    def verify(self, vocab_size: int, max_logprobs: int) -> None:
        """Each step asks the engine for ``2 * beam_width`` candidates per beam."""
        most = min(max_logprobs, vocab_size) // 2
        if self.beam_width > most:
            raise _error(
                "beam_width",
                self.beam_width,
                f"an int in [1, {most}] (each step ranks 2 * beam_width candidates per beam; "
                f"max_logprobs={max_logprobs})",
            )
