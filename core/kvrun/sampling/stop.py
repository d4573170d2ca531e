"""Stop strings over incrementally detokenized text: pure string functions.

The engine appends each step's new text, asks :func:`find_stop` whether a stop string
now appears (also one split across tokens), and streams only the text that
:func:`stop_holdback` says cannot still turn into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StopMatch", "find_stop", "stop_holdback"]


@dataclass(frozen=True)
class StopMatch:
    """A stop string found in the output text."""

    stop: str  # the stop string that matched (the request's stop_reason)
    text: str  # the output text to keep: cut before the stop string, or after it if included


def find_stop(
    text: str,
    num_new_chars: int,
    stops: Sequence[str],
    include_stop_str_in_output: bool,
) -> StopMatch | None:
    """The earliest stop string that ends inside the last ``num_new_chars`` of ``text``.

    Matches wholly inside older text were already checked on earlier steps, so only a
    match overlapping the new text counts. On a tie of start position the stop listed
    first wins. Text after the match is dropped either way.
    """
    new_start = len(text) - min(max(num_new_chars, 0), len(text))
    best: tuple[int, str] | None = None
    for stop in stops:
        # The earliest start for which stop can still reach into the new text.
        index = text.find(stop, max(new_start - len(stop) + 1, 0))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    index, stop = best
    end = index + len(stop) if include_stop_str_in_output else index
    return StopMatch(stop=stop, text=text[:end])


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` to hold back from streaming.

    The length of the longest suffix of ``text`` that is a proper prefix of some stop
    string: those characters may yet become part of a stop string and be cut.
    """
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
