"""Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number,
with text around them (vLLM's ``hermes``)."""

from __future__ import annotations

from kvrun.server.tool_parsers.base import JsonCall, Step, ToolParser
from kvrun.server.tool_parsers.scan import partial_marker_len, skip_space

__all__ = ["HermesToolParser"]

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self) -> None:
        super().__init__()
        self._call: JsonCall | None = None
        self._closing = False  # after a call: an optional </tool_call> may follow

    def _run(self, final: bool) -> None:
        text = self.text
        while True:
            if self._call is not None:
                got = self._call.step(self, final)
                if got is Step.WAIT:
                    return
                call, self._call = self._call, None
                if got is Step.BAD:  # the marker and what failed to be a call were text
                    self._content(START + text[self.pos : call.failed_at])
                    self.pos = call.failed_at
                else:
                    self.pos, self._closing = got, True
            if self._closing:
                at = skip_space(text, self.pos)
                seen = text[at : at + len(END)]
                if seen == END:
                    self.pos = at + len(END)
                elif END.startswith(seen) and not final:
                    return  # maybe the closing marker, arriving
                self._closing = False
            found = text.find(START, self.pos)
            if found < 0:
                hold = 0 if final else partial_marker_len(text, self.pos, START)
                self._content(text[self.pos : len(text) - hold])
                self.pos = len(text) - hold
                return
            self._content(text[self.pos : found])
            self.pos = found + len(START)
            self._call = JsonCall(self.pos)
