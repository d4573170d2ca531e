"""Replies whose shape structured output enforced (tool_choice required or a named
function): no markers to find, the whole reply is the call(s)."""

from __future__ import annotations

from kvrun.server.tool_parsers.base import JsonArrayCalls, Step, ToolParser
from kvrun.server.tool_parsers.scan import skip_space

__all__ = ["NamedToolParser", "RequiredToolParser"]


class RequiredToolParser(ToolParser):
    """tool_choice "required": a JSON array of ``{"name": ..., "parameters": {...}}``."""

    name = "required"

    def __init__(self) -> None:
        super().__init__()
        self._array: JsonArrayCalls | None = None
        self._started = False

    def _run(self, final: bool) -> None:
        text = self.text
        if not self._started:
            at = skip_space(text, self.pos)
            if at == len(text) and not final:
                return
            self._started = True
            if at < len(text) and text[at] == "[":
                self._array = JsonArrayCalls(at)
        if self._array is not None:
            got = self._array.step(self, final)
            if got is Step.WAIT:
                return
            self._array = None
            if got is not Step.BAD:
                self.pos = got
        self._content(text[self.pos :])  # only where the constraint was not applied
        self.pos = len(text)


class NamedToolParser(ToolParser):
    """tool_choice naming one function: the reply is that function's arguments object."""

    name = "named"

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function
        self._index: int | None = None

    def _run(self, final: bool) -> None:
        if self._index is None:
            at = skip_space(self.text, self.pos)  # whitespace before the object is not in it
            if at == len(self.text) and not final:
                return
            self._index, self.pos = self._start_call(self.function), at
        self._arguments(self._index, self.text[self.pos :])
        self.pos = len(self.text)
