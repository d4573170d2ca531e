"""Streaming token ids to text, a few tokens at a time.

Re-decoding the whole output every step costs O(n) per token. Instead we decode a
short window: it starts at a token boundary where the text was last complete, so
the window's text lines up with the full text, and the tokens before the newest
ones give the decoder its left context (a sentencepiece decoder strips the leading
space of the first token it sees; here that token is context whose text was
already emitted). A window whose text ends in U+FFFD may end inside a multi-byte
character split over tokens: that one character is held back until the next bytes
decide it, so the stream never shows a replacement character that the full text
does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvrun.tokenizer.core import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context for the first generated tokens.
_CONTEXT_TOKENS = 5
# A window this long without a complete-character boundary at its end gets cut at
# an earlier clean split, so a long run of tokens that each end inside a character
# (CJK pieces, or a model emitting stray lead bytes) cannot grow it without bound.
_MAX_WINDOW = 32


def _stable_length(text: str) -> int:
    """Length of ``text`` that no later byte can change.

    Lossy UTF-8 decoding turns only the final incomplete sequence into one U+FFFD
    that a later byte may complete; earlier U+FFFDs are invalid bytes for good.
    """
    return len(text) - 1 if text.endswith(_REPLACEMENT) else len(text)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    Invariant: the concatenation of every delta returned by :meth:`add_tokens`
    and :meth:`finish` equals ``tokenizer.decode(output_ids, skip_special_tokens)``
    for byte-level BPE tokenizers (the text of the generated ids alone). Each call
    decodes at most a window of recent tokens, not the whole output.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # The window: ids[0] sits where the text was complete; ids[:boundary] decode to
        # complete text; the first `emitted` characters of decode(ids) are already out.
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # A prompt given as ids may end inside a character; its dangling bytes must not
        # merge into the output's text, so such tokens are not used as context.
        while context and _stable_length(text := self._decode(context)) != len(text):
            context.pop()
        self._ids: list[int] = context
        self._boundary = len(context)
        self._emitted = len(self._decode(context))
        self._text_parts: list[str] = []
        self._finished = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append generated ids; returns the text they complete ("" while a character
        is still split)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add_tokens after finish()")
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        stable = _stable_length(text)
        delta = text[self._emitted : stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        if stable == len(text):
            # Complete: keep only the tokens since the previous boundary, as context.
            if self._boundary > 0:
                del self._ids[: self._boundary]
                self._emitted = len(self._decode(self._ids))
            self._boundary = len(self._ids)
        elif len(self._ids) > _MAX_WINDOW:
            self._cut_at_earlier_boundary()
        if delta:
            self._text_parts.append(delta)
        return delta

    def _cut_at_earlier_boundary(self) -> None:
        """Drop the window's head at the latest token where the text splits cleanly.

        A clean split k has decode(ids[:k]) + decode(ids[k:]) == decode(ids): no
        character spans it and the decoder needs no context across it. Without one
        (a decoder that strips leading spaces) the window keeps growing.
        """
        text = self._decode(self._ids)
        for cut in range(len(self._ids) - 1, 0, -1):
            head = self._decode(self._ids[:cut])
            if len(head) <= self._emitted and head + self._decode(self._ids[cut:]) == text:
                del self._ids[:cut]
                self._emitted -= len(head)
                self._boundary = 0
                return

    def finish(self) -> str:
        """End the stream; returns held-back text (an incomplete character as U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._ids)
        delta = text[self._emitted :]
        self._emitted = len(text)
        if delta:
            self._text_parts.append(delta)
        return delta
