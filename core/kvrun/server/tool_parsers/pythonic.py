"""Pythonic tool calls (Llama 3.2 / 4, Toolace): the reply is a Python list of calls,
``[get_weather(city="Paris", days=3), now()]``, optionally inside
``<|python_start|>...<|python_end|>`` (vLLM's ``pythonic``). Each call is read with
:func:`ast.parse` (never evaluated), keyword arguments only, literal values only.
A reply that does not start with such a list is text."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from kvrun.server.tool_parsers.base import MAX_CALL_CHARS, ToolParser
from kvrun.server.tool_parsers.scan import PyListScan, skip_space

__all__ = ["PythonicToolParser", "python_call"]

START = "<|python_start|>"
END = "<|python_end|>"
_MAX_DEPTH = 64  # nesting of one argument's value


class _NotLiteral(Exception):
    pass


def _literal(node: ast.expr, depth: int = 0) -> Any:
    """A JSON value from a literal expression; anything else raises _NotLiteral."""
    if depth > _MAX_DEPTH:
        raise _NotLiteral
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _literal(node.operand, depth + 1)
        if isinstance(operand, bool) or not isinstance(operand, int | float):
            raise _NotLiteral
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item, depth + 1) for item in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, item in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _NotLiteral
            out[key.value] = _literal(item, depth + 1)
        return out
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]  # JSON spellings
    raise _NotLiteral


def python_call(source: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call expression ``name(key=value, ...)``, or None."""
    if len(source) > MAX_CALL_CHARS:
        return None
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        return None
    arguments: dict[str, Any] = {}
    try:
        for keyword in call.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            arguments[keyword.arg] = _literal(keyword.value)
    except _NotLiteral:
        return None
    return call.func.id, json.dumps(arguments, ensure_ascii=False)


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._list: PyListScan | None = None

    def _run(self, final: bool) -> None:
        text = self.text
        if not self._started:
            at = skip_space(text, self.pos)
            if text.startswith(START, at):
                at = skip_space(text, at + len(START))
            rest = text[at : at + len(START)]
            if not final and (at == len(text) or (START.startswith(rest) and rest != START)):
                return
            self._started = True
            if at < len(text) and text[at] == "[":
                self._list = PyListScan(at)
        if self._list is not None:
            for begin, end in self._list.advance(text):
                call = python_call(text[begin:end])
                if call is None:
                    # the rest is text: all of it if no call went out
                    self._list = None
                    if self.num_calls:
                        self.pos = begin
                    break
                index = self._start_call(call[0])
                self._arguments(index, call[1])
                self.pos = end
            if self._list is not None:
                if self._list.end is None:
                    if not final:
                        return
                    self._list = None  # cut off: the unfinished call is text
                else:
                    self.pos = self._list.end
                    at = skip_space(text, self.pos)
                    if text.startswith(END, at):
                        self.pos = at + len(END)
                    elif not final and END.startswith(text[at:]):
                        return  # maybe the closing tag, arriving
                    self._list = None
        self._content(text[self.pos :])
        self.pos = len(text)
