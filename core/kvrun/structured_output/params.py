"""What a request asks its output to conform to, shaped like vLLM's ``StructuredOutputsParams``.

Exactly one constraint per request: a JSON schema (``json``), any JSON object
(``json_object``), a regular expression, a list of choices, a grammar in EBNF (GBNF, as
xgrammar and llama.cpp read it) or a structural tag. The checks here need no grammar
library (types, exactly one constraint, sizes); whether a schema, regex or grammar
compiles is checked by :mod:`kvrun.structured_output.compiler`, with a time bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from kvrun.errors import RequestError

__all__ = ["CONSTRAINT_KINDS", "ConstraintKind", "StructuredOutputsParams"]

ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = (
    "json",
    "json_object",
    "regex",
    "choice",
    "grammar",
    "structural_tag",
)

# Bounds on what one request may hand the grammar compiler (characters of the
# constraint's source text, nesting of a JSON schema, number of choices).
MAX_SOURCE_CHARS = 256 * 1024
MAX_SCHEMA_DEPTH = 64
MAX_CHOICES = 4096

PARAM = "structured_outputs"


def _refuse(field: str, value: object, accepted: str) -> RequestError:
    return RequestError.invalid(f"{PARAM}.{field}", value, accepted)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, iteratively (a deep value must not exhaust the stack);
    stops counting past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _schema_text(value: object) -> str:
    """The ``json`` constraint as JSON text; a dict (or a pydantic model class) is dumped."""
    accepted = "a JSON schema: an object, or its JSON text"
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic model
        value = value.model_json_schema()
    if isinstance(value, str):
        if len(value) > MAX_SOURCE_CHARS:
            raise _refuse(
                "json",
                f"<{len(value)} characters>",
                f"{accepted}, at most {MAX_SOURCE_CHARS} characters",
            )
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _refuse("json", value, f"{accepted} ({exc})") from None
    if not isinstance(value, dict | bool):
        raise _refuse("json", value, accepted)
    if _depth(value, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise _refuse(
            "json",
            "<a schema nested more deeply>",
            f"a schema nested at most {MAX_SCHEMA_DEPTH} levels deep",
        )
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    if len(text) > MAX_SOURCE_CHARS:
        raise _refuse(
            "json",
            f"<{len(text)} characters>",
            f"a schema of at most {MAX_SOURCE_CHARS} characters",
        )
    return text


def _text(field: str, value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _refuse(field, value, f"a non-empty string ({what})")
    if len(value) > MAX_SOURCE_CHARS:
        raise _refuse(
            field, f"<{len(value)} characters>", f"{what} of at most {MAX_SOURCE_CHARS} characters"
        )
    return value


def _choices(value: object) -> tuple[str, ...]:
    accepted = f"a non-empty list of at most {MAX_CHOICES} strings"
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise _refuse("choice", value, accepted)
    if len(value) > MAX_CHOICES or not all(isinstance(c, str) for c in value):
        raise _refuse("choice", value, accepted)
    if sum(len(c) for c in value) > MAX_SOURCE_CHARS:
        raise _refuse(
            "choice", "<long choices>", f"choices of at most {MAX_SOURCE_CHARS} characters in all"
        )
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's field names); frozen and validated on construction.

    ``json`` may be a dict, its JSON text or a pydantic model class; it is kept as
    canonical JSON text (:attr:`source`), which is also the compiled grammar's cache key.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError(
                f"{PARAM} must set exactly one of {', '.join(CONSTRAINT_KINDS)}; "
                f"got {', '.join(given) if given else 'none'}",
                param=PARAM,
            )
        for flag in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, flag), bool):
                raise _refuse(flag, getattr(self, flag), "true or false")
        if self.json_object not in (None, True, False):
            raise _refuse("json_object", self.json_object, "true")
        if self.whitespace_pattern is not None:
            _text("whitespace_pattern", self.whitespace_pattern, "a regular expression")
        kind = given[0]
        put = object.__setattr__
        if kind == "json":
            put(self, "json", _schema_text(self.json))
        elif kind == "regex":
            _text("regex", self.regex, "a regular expression")
        elif kind == "choice":
            put(self, "choice", list(_choices(self.choice)))
        elif kind == "grammar":
            _text("grammar", self.grammar, "a grammar in EBNF")
        elif kind == "structural_tag":
            tag = self.structural_tag
            if isinstance(tag, dict):
                tag = json.dumps(tag, sort_keys=True)
            put(self, "structural_tag", _text("structural_tag", tag, "a structural tag as JSON"))

    @property
    def kind(self) -> ConstraintKind:
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    @property
    def source(self) -> str:
        """The constraint as text: with :attr:`kind` and the options, what identifies it."""
        kind = self.kind
        if kind == "json_object":
            return ""
        if kind == "choice":
            return json.dumps(self.choice, ensure_ascii=False)
        value = getattr(self, kind)
        assert isinstance(value, str)
        return value

    @property
    def cache_key(self) -> tuple[object, ...]:
        return (
            self.kind,
            self.source,
            self.disable_any_whitespace,
            self.disable_additional_properties,
            self.whitespace_pattern,
        )
