"""The tool-parser contract and the pieces the formats share.

A parser reads one sequence's generated text, fed a piece at a time (the whole text
at once for a non-streamed answer), and says what each piece adds: content text and
tool-call deltas in OpenAI's streaming shape. Invariants every parser keeps:

- text, once handed out as content or as a call's arguments, is never taken back;
  a piece that may turn out to start a marker is held until the next one decides;
- a call's first delta carries its index, id and name; later ones add arguments;
- the deltas of a whole text fed in one piece equal those of the same text fed in
  any pieces, concatenated (for output that parses; a call cut off or malformed
  after its name went out stays a call with the arguments it had);
- the work per piece is linear in the piece (resumable scanners, no backtracking
  pattern, JSON and Python parsed only once complete and below a size bound).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from kvrun.server.tool_parsers.scan import JsonValueScan, skip_space

__all__ = [
    "MAX_CALL_CHARS",
    "JsonArrayCalls",
    "JsonCall",
    "ParsedOutput",
    "ParserDelta",
    "Step",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "parse_all",
]

# The largest single call a parser decodes (JSON or Python text); a longer one is text.
MAX_CALL_CHARS = 1 << 20


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a call (OpenAI's ``delta.tool_calls[i]``)."""

    index: int  # the call's position among this sequence's calls
    arguments: str  # the next piece of the arguments' JSON text (may be "")
    id: str | None = None  # set on the call's first delta only, with name
    name: str | None = None


@dataclass
class ParserDelta:
    """What one piece of text added."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ParsedOutput:
    """A whole reply: the text outside the calls (None when there is none) and the calls."""

    content: str | None
    tool_calls: list[ToolCall]


class Step(Enum):
    WAIT = "wait"  # needs more text
    BAD = "bad"  # not a call after all: the caller treats the text as content


class ToolParser(ABC):
    """Base of every tool-call format; see the module docstring for the contract.

    Subclasses implement :meth:`_run`, which consumes ``self.text`` from ``self.pos``
    through :meth:`_content`, :meth:`_start_call` and :meth:`_arguments`.
    """

    name: ClassVar[str]
    # The format's markers are special tokens, which skip_special_tokens would drop.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # text[:pos] is accounted for
        self.num_calls = 0
        self._out = ParserDelta()
        self._held_space = ""  # whitespace-only content, kept until text or the end
        self._any_content = False

    def feed(self, piece: str, final: bool = False) -> ParserDelta:
        """Add ``piece``; ``final`` when no more text will come (flush what is held)."""
        self.text += piece
        self._out = ParserDelta()
        self._run(final)
        if final:
            if self._held_space and not self.num_calls:
                self._out.content += self._held_space
            self._held_space = ""
        return self._out

    @abstractmethod
    def _run(self, final: bool) -> None:
        """Consume ``self.text[self.pos:]`` as far as it can be decided."""

    # emitters -----------------------------------------------------------------------
    def _content(self, text: str) -> None:
        # Whitespace around calls is not content: it is held until real text follows.
        if not text:
            return
        if self._any_content:
            self._out.content += text
            return
        self._held_space += text
        if self._held_space.strip():
            self._out.content += self._held_space
            self._held_space = ""
            self._any_content = True

    def _new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def _start_call(self, name: str, call_id: str | None = None) -> int:
        index = self.num_calls
        self.num_calls += 1
        self._out.calls.append(
            ToolCallDelta(index=index, arguments="", id=call_id or self._new_id(), name=name)
        )
        return index

    def _arguments(self, index: int, text: str) -> None:
        if not text:
            return
        calls = self._out.calls
        if calls and calls[-1].index == index:  # one delta per call per piece
            last = calls[-1]
            calls[-1] = ToolCallDelta(index, last.arguments + text, last.id, last.name)
        else:
            calls.append(ToolCallDelta(index=index, arguments=text))


def parse_all(parser: ToolParser, text: str) -> ParsedOutput:
    """A whole reply through ``parser`` (a fresh one), deltas joined."""
    out = parser.feed(text, final=True)
    calls: list[ToolCall] = []
    for delta in out.calls:
        if delta.id is not None and delta.name is not None:
            calls.append(ToolCall(delta.id, delta.name, delta.arguments))
        else:
            last = calls[delta.index]
            calls[delta.index] = ToolCall(last.id, last.name, last.arguments + delta.arguments)
    return ParsedOutput(out.content or None, calls)


# A call object that names its function first: its arguments can stream as they come.
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]{1,256})"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_HEADER_WINDOW = 1024  # characters of a call object that may precede its arguments


def _decode_call(text: str, begin: int, end: int) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call object, or None when it is not one.

    Arguments that follow the name are kept as the model wrote them (what streaming
    sent); otherwise they are the decoded value written out again.
    """
    if end - begin > MAX_CALL_CHARS:
        return None
    try:
        value = json.loads(text[begin:end])
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    args: Any = value.get("arguments", value.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    header = _HEADER.match(text, begin, min(end, begin + _HEADER_WINDOW))
    if header is not None and isinstance(args, dict) and text[header.end()] == "{":
        scan = JsonValueScan(header.end())
        args_end = scan.advance(text, True)
        assert scan.begin is not None and args_end is not None
        return name, text[scan.begin : args_end]
    if isinstance(args, str):  # arguments already given as JSON text
        return name, args
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


class JsonCall:
    """One call written as a JSON object ``{"name": ..., "arguments"|"parameters": {...}}``
    starting at or after ``start``."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.index: int | None = None  # set once the call's first delta went out
        # After BAD: the text up to here was no call (the caller hands it out as content
        # and goes on after it, so no character is scanned twice).
        self.failed_at = start
        self._object = JsonValueScan(start)
        self._args: JsonValueScan | None = None
        self._sent = 0  # argument characters handed out

    def step(self, parser: ToolParser, final: bool) -> int | Step:
        """Advance over ``parser.text``: the index after the call when done, else a Step."""
        text = parser.text
        if self._object.begin is None:
            at = skip_space(text, self.start)
            if at == len(text):
                return Step.BAD if final else Step.WAIT
            if text[at] != "{":
                return Step.BAD
        end = self._object.advance(text, final)
        begin = self._object.begin
        if end is not None:
            assert begin is not None
            call = _decode_call(text, begin, end)
            if call is None:
                if self.index is None:
                    self.failed_at = end
                    return Step.BAD
                self._send_raw(parser, end)  # the name went out: finish what there is
                return end
            name, arguments = call
            if self.index is None:
                self.index = parser._start_call(name)
                parser._arguments(self.index, arguments)
            elif arguments.startswith(text[self._arg_begin : self._arg_begin + self._sent]):
                parser._arguments(self.index, arguments[self._sent :])
            return end
        if final:
            if self.index is None:
                self.failed_at = len(text)
                return Step.BAD
            self._send_raw(parser, len(text))
            return len(text)
        if self.index is None:
            if begin is None:
                return Step.WAIT
            header = _HEADER.match(text, begin, min(len(text), begin + _HEADER_WINDOW))
            if header is None or header.end() >= len(text) or text[header.end()] != "{":
                return Step.WAIT  # decided once the object is complete
            self.index = parser._start_call(header.group(1))
            self._args = JsonValueScan(header.end())
        assert self._args is not None
        args_end = self._args.advance(text, False)
        self._send_raw(parser, args_end if args_end is not None else self._args.pos)
        return Step.WAIT

    @property
    def _arg_begin(self) -> int:
        assert self._args is not None and self._args.begin is not None
        return self._args.begin

    def _send_raw(self, parser: ToolParser, upto: int) -> None:
        """Hand out the arguments' text as written, up to ``upto`` (or the value's end)."""
        if self._args is None or self._args.begin is None or self.index is None:
            return
        if self._args.end is not None:
            upto = min(upto, self._args.end)
        start = self._args.begin + self._sent
        if upto > start:
            parser._arguments(self.index, parser.text[start:upto])
            self._sent += upto - start


class JsonArrayCalls:
    """A JSON array of call objects, its ``[`` at ``start`` (mistral's older format and
    the output of a required tool_choice)."""

    def __init__(self, start: int) -> None:
        self.pos = start + 1
        self.failed_at = start  # after BAD: as JsonCall.failed_at
        self._call: JsonCall | None = None
        self._calls = 0
        self._expect_element = True  # after [ or a comma

    def step(self, parser: ToolParser, final: bool) -> int | Step:
        """The index after the array (or after its last good call) when done, else a Step;
        BAD when not even the first element is a call."""
        text = parser.text
        while True:
            if self._call is not None:
                got = self._call.step(parser, final)
                if got is Step.WAIT:
                    return got
                if got is Step.BAD:
                    self.failed_at = self._call.failed_at
                    return Step.BAD if not self._calls else self._call.start
                self._calls += 1
                self._call, self.pos, self._expect_element = None, got, False
            at = skip_space(text, self.pos)
            if at == len(text):
                if not final:
                    return Step.WAIT
                self.failed_at = at
                return self.pos if self._calls else Step.BAD
            char = text[at]
            if self._expect_element and char == "{":
                self._call = JsonCall(at)
            elif not self._expect_element and char == ",":
                self.pos, self._expect_element = at + 1, True
            elif not self._expect_element and char == "]":
                return at + 1
            else:
                self.failed_at = at
                return self.pos if self._calls else Step.BAD
