"""Mistral: ``[TOOL_CALLS]`` then either a JSON array of ``{"name", "arguments"}``
objects (older tokenizers) or ``name[ARGS]{...}`` (tokenizer v11 on; optionally
``name[CALL_ID]id[ARGS]{...}``), each call after its own ``[TOOL_CALLS]`` (vLLM's
``mistral``). Call ids are 9 letters and digits, as Mistral's templates require. The
markers are special tokens: the request keeps them (skip_special_tokens false)."""

from __future__ import annotations

import re
import secrets
import string

from kvrun.server.tool_parsers.base import JsonArrayCalls, Step, ToolParser
from kvrun.server.tool_parsers.scan import JsonValueScan, partial_marker_len, skip_space

__all__ = ["MistralToolParser"]

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_NAME_WINDOW = 160  # characters from the marker within which [ARGS] must come
_ID_ALPHABET = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True

    def __init__(self) -> None:
        super().__init__()
        self._after_marker = False
        self._array: JsonArrayCalls | None = None
        self._args: JsonValueScan | None = None
        self._index = 0
        self._sent = 0

    def _new_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def _bad(self) -> None:
        """What followed the marker is no call: the marker was text."""
        self._content(MARKER)
        self._after_marker = False

    def _run(self, final: bool) -> None:
        text = self.text
        while True:
            if self._array is not None:
                got = self._array.step(self, final)
                if got is Step.WAIT:
                    return
                array, self._array = self._array, None
                if got is Step.BAD:  # the marker and what failed to be calls were text
                    self._content(MARKER + text[self.pos : array.failed_at])
                    self.pos = array.failed_at
                else:
                    self.pos = got
            elif self._args is not None:
                end = self._args.advance(text, final)
                begin = self._args.begin
                if begin is not None and (text[begin] == "{" or end is not None):
                    upto = end if end is not None else self._args.pos
                    self._arguments(self._index, text[begin + self._sent : upto])
                    self._sent = upto - begin
                if end is None:
                    return
                self._args, self.pos = None, end
            elif self._after_marker:
                at = skip_space(text, self.pos)
                if at == len(text):
                    if final:
                        self._bad()
                        continue
                    return
                if text[at] == "[" and not text.startswith(ARGS, at):
                    self._array, self._after_marker = JsonArrayCalls(at), False
                    continue
                found = text.find(ARGS, at, at + _NAME_WINDOW)
                if found < 0:
                    if not final and len(text) - at < _NAME_WINDOW:
                        return
                    self._bad()
                    continue
                name, _, call_id = text[at:found].partition(CALL_ID)
                if not _NAME.fullmatch(name.strip()) or (
                    call_id.strip() and not _ID.fullmatch(call_id.strip())
                ):
                    self._bad()
                    continue
                self._after_marker = False
                self._index = self._start_call(name.strip(), call_id.strip() or None)
                self._args, self._sent = JsonValueScan(found + len(ARGS)), 0
                continue
            found = text.find(MARKER, self.pos)
            if found < 0:
                hold = 0 if final else partial_marker_len(text, self.pos, MARKER)
                self._content(text[self.pos : len(text) - hold])
                self.pos = len(text) - hold
                return
            self._content(text[self.pos : found])
            self.pos, self._after_marker = found + len(MARKER), True
