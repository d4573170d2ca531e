"""Linear, resumable scanners for model output that arrives a piece at a time.

Each scanner keeps its position and state between calls, so a text that grows by one
token per step is scanned once in all, and no pattern here can backtrack: the regular
expressions below are single character classes or anchored literals. They check
nesting and quoting only; ``json.loads`` or ``ast.parse`` (with size bounds) checks a
value once the scanner says it is complete.
"""

from __future__ import annotations

import re

__all__ = [
    "JsonValueScan",
    "PyListScan",
    "partial_marker_len",
    "skip_space",
]

_SPACE = " \t\r\n"
_JSON_STRING_RUN = re.compile(r'[^"\\]+')
_JSON_PLAIN_RUN = re.compile(r'[^"\[\]{}]+')
_JSON_SCALAR_END = re.compile(r"[\s,\]}]")
_PY_PLAIN_RUN = re.compile(r"[^\"'\[\](){},]+")
# Inside a string, by its opening quote: runs of characters that cannot end it.
_PY_STRING_RUNS = {
    "'": re.compile(r"[^'\\\n]+"),
    '"': re.compile(r'[^"\\\n]+'),
    "'''": re.compile(r"[^'\\]+"),
    '"""': re.compile(r'[^"\\]+'),
}


def skip_space(text: str, pos: int) -> int:
    """The first index at or after ``pos`` that is not whitespace (len(text) if none)."""
    n = len(text)
    while pos < n and text[pos] in _SPACE:
        pos += 1
    return pos


def partial_marker_len(text: str, start: int, marker: str) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper prefix of ``marker``:
    characters to hold back because the next piece may complete the marker."""
    for k in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class JsonValueScan:
    """Where one JSON value that starts at or after ``start`` ends, over a growing text.

    :attr:`begin` is the value's first character once seen, :attr:`pos` how far the
    scan got (everything before it belongs to the value), :attr:`end` the index after
    the value once it is complete.
    """

    def __init__(self, start: int) -> None:
        self.pos = start
        self.begin: int | None = None
        self.end: int | None = None
        self._depth = 0
        self._in_string = False
        self._scalar = False

    def advance(self, text: str, final: bool) -> int | None:
        """Scan what arrived; the value's end, or None while it is incomplete."""
        if self.end is not None:
            return self.end
        n = len(text)
        pos = self.pos
        if self.begin is None:
            pos = skip_space(text, pos)
            if pos == n:
                self.pos = pos
                return None
            self.begin = pos
            first = text[pos]
            if first in "{[":
                self._depth, pos = 1, pos + 1
            elif first == '"':
                self._in_string, pos = True, pos + 1
            else:
                self._scalar = True
        if self._scalar:
            match = _JSON_SCALAR_END.search(text, pos)
            if match is not None:
                self.end = match.start()
            elif final:
                self.end = n
            self.pos = n if self.end is None else self.end
            return self.end
        while pos < n:
            if self._in_string:
                run = _JSON_STRING_RUN.match(text, pos)
                if run is not None:
                    pos = run.end()
                    continue
                if text[pos] == "\\":
                    if pos + 1 >= n:
                        break  # the escaped character has not arrived
                    pos += 2
                    continue
                self._in_string = False
                pos += 1
                if self._depth == 0:
                    self.end = pos
                    break
                continue
            run = _JSON_PLAIN_RUN.match(text, pos)
            if run is not None:
                pos = run.end()
                continue
            char = text[pos]
            pos += 1
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.end = pos
                    break
        self.pos = pos
        return self.end


class PyListScan:
    """The top-level elements of a Python list literal (``[a(x=1), b()]``) that starts
    at ``start`` (its ``[``), over a growing text; strings in any of Python's four
    quotings are skipped whole."""

    def __init__(self, start: int) -> None:
        self.pos = start + 1
        self.end: int | None = None  # the index after the closing ]
        self._depth = 1
        self._quote: str | None = None  # the quote that opened the current string
        self._element = start + 1  # where the current element began

    def advance(self, text: str) -> list[tuple[int, int]]:
        """Scan what arrived; the (start, end) of each element completed meanwhile."""
        done: list[tuple[int, int]] = []
        n = len(text)
        pos = self.pos
        while pos < n and self.end is None:
            quote = self._quote
            if quote is not None:
                run = _PY_STRING_RUNS[quote].match(text, pos)
                if run is not None:
                    pos = run.end()
                    continue
                char = text[pos]
                if char == "\\":
                    if pos + 1 >= n:
                        break  # the escaped character has not arrived
                    pos += 2
                elif char != quote[0]:
                    pos += 1  # a newline in a one-line string: ast.parse refuses it later
                elif len(quote) == 1 or text.startswith(quote, pos):
                    pos, self._quote = pos + len(quote), None
                elif n - pos < 3 and text[pos:] == char * (n - pos):
                    break  # maybe the start of the closing triple quote: wait for more
                else:
                    pos += 1
                continue
            run = _PY_PLAIN_RUN.match(text, pos)
            if run is not None:
                pos = run.end()
                continue
            char = text[pos]
            if char in "\"'":
                if text.startswith(char * 3, pos):
                    self._quote, pos = char * 3, pos + 3
                elif pos + 2 >= n and text[pos:] == char * (n - pos):
                    break  # '' or ' at the end: one, two or three quotes? wait and see
                else:
                    self._quote, pos = char, pos + 1
                continue
            pos += 1
            if char in "[({":
                self._depth += 1
            elif char in "])}":
                self._depth -= 1
                if self._depth == 0:
                    if text[self._element : pos - 1].strip():
                        done.append((self._element, pos - 1))
                    self.end = pos
            elif char == "," and self._depth == 1:
                done.append((self._element, pos - 1))
                self._element = pos
        self.pos = pos
        return done
