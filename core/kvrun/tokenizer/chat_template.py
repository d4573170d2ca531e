"""Rendering chat templates in a Jinja sandbox, the way transformers renders them.

Chat templates come from model repositories and user requests, so they are
untrusted code: they run in ``ImmutableSandboxedEnvironment`` (no attribute
access to ``__class__`` and friends, no mutation of the data passed in), and
everything handed to them is first rebuilt from plain JSON-like values so no
object with dangerous methods reaches the template. The helpers templates expect
(``raise_exception``, ``strftime_now``, the ``tojson`` filter without HTML
escaping, ``{% generation %}`` blocks, loop controls) match transformers', so the
same template renders the same text.

Every render is bounded (:data:`RENDER_SECONDS`, :data:`RENDER_CHARS`): the output is
produced piece by piece and the clock is checked after each piece and on every call
the template makes, so a template that loops for ever or grows without end fails with
a ChatTemplateError instead of holding a server thread.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvrun.errors import KvrunError

__all__ = [
    "RENDER_CHARS",
    "RENDER_SECONDS",
    "ChatTemplateError",
    "compile_chat_template",
    "render_chat_template",
]

# One render's bounds: far beyond any real template's (milliseconds, a prompt's size).
RENDER_SECONDS = 5.0
RENDER_CHARS = 16 << 20
# The running render's deadline (time.monotonic), seen by the sandbox's call hook.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "kvrun_template_deadline", default=None
)

# Appended to the final message when continuing it, then cut off the rendered text.
_CONTINUE_TAG = "KVRUN_CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(KvrunError):
    """A chat template that fails to compile or render, or refuses the conversation."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text; renders its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, which could shadow internals."""

    # self arrives in *args, as in Jinja's Namespace, so `namespace(self=...)` still works
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set the underscore attribute {name!r} on a namespace"
            )


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates want the plain JSON text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, checking the render's deadline on every call it makes."""

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)


def _check_deadline() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(
            f"the chat template took longer than {RENDER_SECONDS:g} s to render; accepted: "
            "templates that render within that bound"
        )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in a fresh sandbox with transformers' template helpers."""
    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    # the builtin `dict` global is the type itself; templates only need to call it
    env.globals["dict"] = _make_dict
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile: {exc.message} (line {exc.lineno})"
        ) from exc


def _plain(value: Any) -> Any:
    """``value`` rebuilt from str/int/float/bool/None, dicts, lists and tuples only."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (enums, numpy scalars) can carry methods: keep only the base value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    dump = getattr(value, "model_dump", None)  # pydantic models, e.g. OpenAI SDK messages
    if callable(dump):
        return _plain(dump())
    return f"<{type(value).__name__}>"


def _message(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        dump = getattr(raw, "model_dump", None)
        if not callable(dump):
            raise ChatTemplateError(f"a chat message must be a dict, got {type(raw).__name__}")
        raw = dump()
    # Keys set to None (OpenAI's content=None) render as "None" in many templates.
    message: dict[str, Any] = {k: _plain(v) for k, v in raw.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is not None:
        # templates read reasoning as `reasoning_content` or (gpt-oss) `thinking`
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render a compiled template over ``messages``; ``variables`` are extra template names.

    ``continue_final_message`` leaves the last message open (no end-of-turn) so the
    model continues it; it excludes ``add_generation_prompt``.
    """
    chat = [_message(m) for m in messages]
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt exclude each other: the first "
                "continues the last message, the second starts a new assistant turn"
            )
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ChatTemplateError(
                "continue_final_message needs a final message whose content is a string"
            )
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    context = {k: _plain(v) for k, v in (variables or {}).items()}
    token = _DEADLINE.set(time.monotonic() + RENDER_SECONDS)
    try:
        text = _bounded_render(
            template,
            {
                **context,
                "messages": chat,
                "tools": _plain(list(tools)) if tools is not None else None,
                "documents": _plain(list(documents)) if documents is not None else None,
                "add_generation_prompt": add_generation_prompt,
            },
        )
    except ChatTemplateError:
        raise  # a bound, named already (it is a ValueError: keep it out of the next clauses)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template tried an unsafe operation: {exc}") from exc
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from exc
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
        raise ChatTemplateError(f"the chat template failed to render: {exc!r}") from exc
    finally:
        _DEADLINE.reset(token)
    if continue_final_message:
        cut = text.rfind(_CONTINUE_TAG.strip())
        if cut < 0 or final.strip() not in text:
            raise ChatTemplateError(
                "continue_final_message is set but the chat template dropped or rewrote the final "
                "message, so it cannot be continued"
            )
        # keep the final message's own trailing spacing only if the template preserved it
        if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            text = text[:cut]
        else:
            text = text[:cut].rstrip()
    return text


def _bounded_render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """The template's text, piece by piece, within the render's time and size bounds."""
    pieces: list[str] = []
    size = 0
    for piece in template.generate(**variables):
        pieces.append(piece)
        size += len(piece)
        if size > RENDER_CHARS:
            raise ChatTemplateError(
                f"the chat template rendered more than {RENDER_CHARS} characters; accepted: "
                "templates whose text stays within that bound"
            )
        _check_deadline()
    return "".join(pieces)
