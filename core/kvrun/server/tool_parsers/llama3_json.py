"""Llama 3.1 / 3.2 / 4 JSON tool calls: the reply is a JSON object ``{"name": ...,
"parameters"|"arguments": {...}}``, optionally after ``<|python_tag|>``, and further
ones after ``;`` (vLLM's ``llama3_json``). A reply that does not start so is text."""

from __future__ import annotations

from kvrun.server.tool_parsers.base import JsonCall, Step, ToolParser
from kvrun.server.tool_parsers.scan import skip_space

__all__ = ["Llama3JsonToolParser"]

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self) -> None:
        super().__init__()
        self._started = False  # the start of the reply was read
        self._text_only = False  # the rest is text
        self._call: JsonCall | None = None

    def _run(self, final: bool) -> None:
        text = self.text
        if not self._started:
            at = skip_space(text, self.pos)
            rest = text[at : at + len(TAG)]
            if not final and (at == len(text) or (TAG.startswith(rest) and rest != TAG)):
                return
            self._started = True
            if rest == TAG:
                self._call = JsonCall(at + len(TAG))
            elif at < len(text) and text[at] == "{":
                self._call = JsonCall(at)
            else:
                self._text_only = True
        while not self._text_only:
            if self._call is not None:
                got = self._call.step(self, final)
                if got is Step.WAIT:
                    return
                self._call = None
                if got is Step.BAD:
                    self._text_only = True
                    break
                self.pos = got
            at = skip_space(text, self.pos)
            if at == len(text):
                if final:
                    break
                return
            if text[at] != ";":
                break
            self._call = JsonCall(at + 1)
        self._text_only = True
        self._content(text[self.pos :])
        self.pos = len(text)
