"""Checking and compiling output constraints, and matching tokens against them.

Two backends, as vLLM names them: ``xgrammar`` (the default, "auto") and ``guidance``
(llguidance, where it is installed; no structural tags, no whitespace options).

Two steps, as vLLM splits them:

- :func:`check_constraint` turns a request's :class:`StructuredOutputsParams` into a
  grammar, without a tokenizer. It is cheap (the sizes are capped in the params) and is
  where a bad schema, regex or grammar becomes a :class:`RequestError` naming the field:
  the server runs it before a request reaches the engine, the engine runs it again in
  ``add_request`` so the offline API refuses alike.
- :class:`GrammarCompiler` compiles a checked grammar against the model's vocabulary
  (which tokens can extend which partial output). That is the costly part; it runs in a
  worker thread, off the engine loop, with a time bound, and its results are cached by
  the constraint (:attr:`StructuredOutputsParams.cache_key`).

A compiled grammar hands out one :class:`ConstraintMatcher` per sequence: it fills the
sequence's row of the step's token bitmask and accepts each token the sequence samples.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kvrun.errors import ConfigError, RequestError
from kvrun.structured_output.params import PARAM, StructuredOutputsParams

if TYPE_CHECKING:
    from kvrun.tokenizer import Tokenizer

__all__ = [
    "BACKENDS",
    "COMPILE_TIMEOUT_S",
    "CompiledConstraint",
    "ConstraintMatcher",
    "GrammarCompiler",
    "allocate_token_bitmask",
    "check_constraint",
    "check_regex",
    "resolve_backend",
]

logger = logging.getLogger(__name__)

# What `structured_outputs_config.backend` / `guided_decoding_backend` accept. "auto" is
# xgrammar; "guidance" is llguidance, where it is installed (pip install 'kvrun[guidance]').
BACKENDS = ("auto", "xgrammar", "guidance")
# How long a request waits for its grammar to compile before it is refused.
COMPILE_TIMEOUT_S = 30.0
# The longest run of whitespace a JSON constraint allows between tokens: enough to
# pretty-print ten levels deep, and a small model cannot loop on blank lines until
# max_tokens (it must write the next part of the value).
MAX_JSON_WHITESPACE = 24
# Compiled grammars kept per engine (least recently used dropped first).
CACHE_ENTRIES = 256


def resolve_backend(name: str | None) -> str:
    """The backend a configuration or request names; a ConfigError for one kvrun lacks."""
    if name is None or name == "auto":
        return "xgrammar"
    if name not in BACKENDS:
        raise ConfigError(
            f"structured output backend {name!r} is not available in kvrun; accepted: "
            f"{', '.join(BACKENDS)} (outlines and lm-format-enforcer are not built in)"
        )
    if name == "guidance":
        _llg()
    return name


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # a declared dependency: a broken install
        raise ConfigError(
            f"structured output needs the xgrammar package, which did not import ({exc}); "
            "reinstall kvrun (pip install 'xgrammar>=0.2.8')"
        ) from None
    return xgrammar


def _llg() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as exc:
        raise ConfigError(
            f"the guidance structured output backend needs the llguidance package ({exc}); "
            "pip install 'kvrun[guidance]', or use the xgrammar backend"
        ) from None
    return llguidance


def _refuse(field: str, value: object, accepted: str) -> RequestError:
    return RequestError.invalid(f"{PARAM}.{field}", value, accepted)


def _quantifier(pattern: str, i: int) -> tuple[int, bool, bool] | None:
    """The quantifier at ``i``: (its length, may repeat zero times, repeats without bound)."""
    ch = pattern[i]
    if ch in "*+?":
        return 1, ch != "+", ch != "?"
    if ch == "{":
        close = pattern.find("}", i, i + 24)  # a bound stays short: linear time on any input
        body = pattern[i + 1 : close] if close > 0 else ""
        lo, _, hi = body.partition(",")
        if close > 0 and lo.strip().isdigit() and (not hi.strip() or hi.strip().isdigit()):
            unbounded = "," in body and not hi.strip()
            return close + 1 - i, int(lo) == 0, unbounded
    return None


def _repeats_alone(alternatives: list[list[list[bool]]]) -> bool:
    """Whether some alternative is, besides parts that may be empty, one unbounded repetition."""
    for items in alternatives:
        solid = [item for item in items if not item[0]]
        if (len(solid) == 1 and solid[0][1]) or (not solid and any(i[1] for i in items)):
            return True
    return False


def check_regex(pattern: str, field: str = "regex") -> None:
    """Refuse nested unbounded repetition such as ``(a+)+``, ``(a|b+)*`` or ``(\\s*\\w+)*``.

    Such a pattern matches one text in exponentially many ways: a backtracking engine
    (Python's re, any client checking the output) can spend forever on it, and a grammar
    matcher carries every way along. Nothing is lost by refusing it: the flat form
    (``a+``) accepts the same texts. Repetition of a group that has another fixed part,
    such as ``(\\d+,)*``, is unambiguous and accepted.
    """
    # Per open group: its alternatives so far, each a list of [nullable, unbounded] items.
    frames: list[list[list[list[bool]]]] = [[[]]]
    last_is_risky_group = False  # the item just ended was a group that repeats alone
    after_quantifier = False
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        items = frames[-1][-1]
        quantifier = _quantifier(pattern, i) if items else None
        if quantifier is not None:
            length, nullable, unbounded = quantifier
            if after_quantifier and ch in "?+":  # a lazy or possessive modifier
                i += 1
                after_quantifier = False
                continue
            if unbounded and last_is_risky_group:
                raise _refuse(
                    field,
                    pattern,
                    "a regular expression without nested unbounded repetition (a group "
                    "that is itself one repetition, like (a+)+, matches a text in "
                    "exponentially many ways; write the flat form, like a+)",
                )
            items[-1][0] = items[-1][0] or nullable
            items[-1][1] = items[-1][1] or unbounded
            i += length
            last_is_risky_group = False
            after_quantifier = True
            continue
        after_quantifier = False
        last_is_risky_group = False
        if ch == "\\":
            items.append([False, False])
            i += 2
        elif ch == "[":  # a character class, one item
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            items.append([False, False])
            i = j + 1
        elif ch == "(":
            frames.append([[]])
            i += 1
            if pattern.startswith("?:", i):
                i += 2
        elif ch == ")" and len(frames) > 1:
            alternatives = frames.pop()
            nullable = any(all(item[0] for item in alt) for alt in alternatives)
            # A group that is one repetition counts as one where it stands: ((a+))+
            last_is_risky_group = _repeats_alone(alternatives)
            frames[-1][-1].append([nullable, last_is_risky_group])
            i += 1
        elif ch == "|":
            frames[-1].append([])
            i += 1
        elif ch in "^$":
            i += 1
        else:
            items.append([False, False])
            i += 1


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _choice_grammar(choices: Iterable[str]) -> str:
    alternatives = " | ".join(_ebnf_literal(c) for c in choices if c)
    if not alternatives:
        raise _refuse("choice", list(choices), "a list with at least one non-empty string")
    return f"root ::= {alternatives}"


def _structural_tag(xgr: Any, text: str) -> Any:
    """vLLM's two structural-tag shapes: ``structures`` + ``triggers`` (the first one), or
    xgrammar's own ``{"type": "structural_tag", "format": ...}``."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _refuse("structural_tag", text, f"a structural tag as JSON ({exc})") from None
    if isinstance(tag, dict) and "structures" in tag:
        accepted = (
            "{'structures': [{'begin': str, 'schema': {...}, 'end': str}, ...], "
            "'triggers': [str, ...]}"
        )
        structures, triggers = tag.get("structures"), tag.get("triggers")
        if not isinstance(structures, list) or not isinstance(triggers, list):
            raise _refuse("structural_tag", text, accepted)
        items = []
        for s in structures:
            if not isinstance(s, dict) or not {"begin", "schema", "end"} <= set(s):
                raise _refuse("structural_tag", text, accepted)
            items.append(
                xgr.StructuralTagItem(
                    begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"]
                )
            )
        return xgr.Grammar.from_structural_tag(items, triggers)
    return xgr.Grammar.from_structural_tag(text)


def check_constraint(params: StructuredOutputsParams, backend: str = "xgrammar") -> Any:
    """The constraint as ``backend``'s grammar (an xgrammar Grammar, or llguidance's
    grammar text); a RequestError naming the field when it is not one."""
    if backend == "guidance":
        return _guidance_grammar(params)
    return _xgrammar_grammar(params)


_WHAT = {
    "json": "a JSON schema that the backend supports",
    "regex": "a regular expression",
    "choice": "a list of strings",
    "grammar": "a grammar in EBNF (GBNF) with a root rule",
    "structural_tag": "a structural tag",
}


def _guidance_grammar(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the constraint, validated."""
    llg = _llg()
    kind = params.kind
    if kind == "structural_tag":
        raise _refuse(
            "structural_tag", params.source, "None: structural tags need the xgrammar backend"
        )
    try:
        if kind in ("json", "json_object"):
            schema = json.loads(params.source) if kind == "json" else {"type": "object"}
            if not isinstance(schema, dict):
                schema = {} if schema is True else {"not": {}}
            if params.disable_additional_properties:
                schema.setdefault("additionalProperties", False)
            # llguidance's options: no whitespace at all, or runs of at most
            # MAX_JSON_WHITESPACE (the pattern a request gives, else that bound)
            pattern = params.whitespace_pattern or f"[ \\t\\n\\r]{{0,{MAX_JSON_WHITESPACE}}}"
            schema["x-guidance"] = (
                {"whitespace_flexible": False}
                if params.disable_any_whitespace
                else {"whitespace_flexible": True, "whitespace_pattern": pattern}
            )
            grammar = llg.grammar_from("json_schema", json.dumps(schema))
        elif kind == "regex":
            check_regex(params.source)
            re.compile(params.source)  # Python's syntax, as the other backends read it
            grammar = llg.grammar_from("regex", params.source)
        elif kind == "choice":
            assert params.choice is not None
            grammar = llg.grammar_from(
                "lark", "start: " + " | ".join(json.dumps(c) for c in params.choice if c)
            )
        else:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            grammar = llg.grammar_from("lark", gbnf_to_lark(params.source))
    except RequestError:
        raise
    except (re.error, ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise _refuse(kind, params.source, f"{_WHAT[kind]} ({exc})") from None
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise _refuse(kind, params.source, f"{_WHAT[kind]} ({error.strip().splitlines()[0]})")
    return str(grammar)


def _xgrammar_grammar(params: StructuredOutputsParams) -> Any:  # an xgrammar.Grammar
    xgr = _xgr()
    kind = params.kind
    if params.whitespace_pattern is not None:
        raise _refuse(
            "whitespace_pattern",
            params.whitespace_pattern,
            "None: the xgrammar backend allows any JSON whitespace, or none with "
            "disable_any_whitespace=true",
        )
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(
                params.source,
                any_whitespace=not params.disable_any_whitespace,
                max_whitespace_cnt=MAX_JSON_WHITESPACE,
            )
        if kind == "json_object":  # OpenAI's JSON mode: an object, with any members
            return xgr.Grammar.from_json_schema(
                '{"type": "object"}',
                any_whitespace=not params.disable_any_whitespace,
                max_whitespace_cnt=MAX_JSON_WHITESPACE,
                strict_mode=False,
            )
        if kind == "regex":
            check_regex(params.source)
            return xgr.Grammar.from_regex(params.source)
        if kind == "choice":
            assert params.choice is not None
            return xgr.Grammar.from_ebnf(_choice_grammar(params.choice))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(params.source)
        return _structural_tag(xgr, params.source)
    except RequestError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        # xgrammar prefixes its messages with a time and a source position
        reason = reason.split(": ", 1)[-1] if reason.startswith("[") else reason
        raise _refuse(kind, params.source, f"{_WHAT[kind]} ({reason})") from None


def allocate_token_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab_size / 32)] int32, all tokens allowed: bit t % 32 of word t // 32."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


class ConstraintMatcher(Protocol):
    """One sequence's position in its grammar (whichever backend compiled it)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` (from :func:`allocate_token_bitmask`): the tokens
        that keep the output inside the grammar (stop tokens where it may end)."""

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """The grammar has ended (a stop token was accepted): nothing may follow."""


class _XgrammarMatcher:
    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class _GuidanceMatcher:
    __slots__ = ("_fill", "_matcher")

    def __init__(self, matcher: Any, fill: Any) -> None:
        self._matcher = matcher
        self._fill = fill  # llguidance.torch.fill_next_token_bitmask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._fill(self._matcher, bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.consume_token(token_id)) and not self._matcher.is_error()

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())


class CompiledConstraint:
    """A grammar compiled against one vocabulary; makes a matcher per sequence."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[], ConstraintMatcher]) -> None:
        self._make = make

    def matcher(self) -> ConstraintMatcher:
        return self._make()


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary, in a worker thread, with a cache.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's:
    the extra ids are never allowed).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, backend: str | None = None) -> None:
        self.backend = resolve_backend(backend)
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._compiler: Any = None  # built on first use: the vocabulary scan takes ~0.3 s
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[object, ...], CompiledConstraint] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvrun-grammar")

    def _hf_tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.backend)  # type: ignore[no-untyped-call]

    def _xgr_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(
                self._hf_tokenizer(),
                vocab_size=self.vocab_size,
                stop_token_ids=sorted(self._tokenizer.eos_token_ids),
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def _compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        key = params.cache_key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = check_constraint(params, self.backend)
        compiled = self._compile_grammar(grammar)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def _compile_grammar(self, grammar: Any) -> CompiledConstraint:
        if self.backend == "guidance":
            llg = _llg()
            if self._compiler is None:  # the vocabulary, once
                self._compiler = llg.hf.from_tokenizer(
                    self._hf_tokenizer(),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids),
                )
            tokenizer, fill = self._compiler, llg.torch.fill_next_token_bitmask
            return CompiledConstraint(
                lambda: _GuidanceMatcher(llg.LLMatcher(tokenizer, grammar), fill)
            )
        compiled = self._xgr_compiler().compile_grammar(grammar)
        xgr = _xgr()
        return CompiledConstraint(lambda: _XgrammarMatcher(xgr.GrammarMatcher(compiled)))

    def submit(self, params: StructuredOutputsParams) -> Future[CompiledConstraint]:
        """Compile in the worker thread; the future holds the result or the RequestError."""
        return self._pool.submit(self._compile, params)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
