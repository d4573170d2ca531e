"""Reasoning output: the ``<think>...</think>`` part of a reply as ``reasoning_content``.

``--reasoning-parser`` picks the format, as vLLM names them:

- ``deepseek_r1``: the reply starts inside the reasoning (DeepSeek-R1's template opens
  ``<think>`` in the prompt; a ``<think>`` the model writes itself is dropped); all
  text up to ``</think>`` is reasoning, the rest content. A reply without
  ``</think>`` is reasoning only.
- ``qwen3``: reasoning only when the reply opens ``<think>`` itself or the rendered
  prompt ends with an open ``<think>`` (Qwen3's thinking-only templates); otherwise
  the whole reply is content, and ``chat_template_kwargs`` ``enable_thinking: false``
  turns reasoning off.

A parser is fed the reply a piece at a time (the whole reply at once for a
non-streamed answer) and gives the same split either way; a piece that may be the
start of a marker is held until the next one decides; work is linear in the text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kvrun.server.tool_parsers.scan import partial_marker_len, skip_space

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "make_reasoning_parser"]

START = "<think>"
END = "</think>"


class _Mode(Enum):
    UNDECIDED = "undecided"  # qwen3: does the reply open <think>?
    OPENING = "opening"  # inside the reasoning; drop a leading <think>
    REASONING = "reasoning"
    CONTENT = "content"


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Splits one sequence's reply into reasoning and content; see the module docstring."""

    def __init__(self, *, in_reasoning: bool, enabled: bool = True) -> None:
        self.text = ""
        self.pos = 0
        if not enabled:
            self._mode = _Mode.CONTENT
        else:
            self._mode = _Mode.OPENING if in_reasoning else _Mode.UNDECIDED

    def feed(self, piece: str, final: bool = False) -> ReasoningDelta:
        self.text += piece
        text, out = self.text, ReasoningDelta()
        while True:
            mode = self._mode
            if mode in (_Mode.UNDECIDED, _Mode.OPENING):
                at = skip_space(text, self.pos)
                seen = text[at : at + len(START)]
                if seen == START:
                    self.pos, self._mode = at + len(START), _Mode.REASONING
                    continue
                if not final and START.startswith(seen):
                    return out  # maybe <think>, arriving
                self._mode = _Mode.REASONING if mode is _Mode.OPENING else _Mode.CONTENT
            elif mode is _Mode.REASONING:
                found = text.find(END, self.pos)
                if found >= 0:
                    out.reasoning += text[self.pos : found]
                    self.pos, self._mode = found + len(END), _Mode.CONTENT
                    continue
                hold = 0 if final else partial_marker_len(text, self.pos, END)
                out.reasoning += text[self.pos : len(text) - hold]
                self.pos = len(text) - hold
                return out
            else:
                out.content += text[self.pos :]
                self.pos = len(text)
                return out


def _deepseek_r1(prompt: str, template_kwargs: Mapping[str, Any]) -> ReasoningParser:
    return ReasoningParser(in_reasoning=True)


def _qwen3(prompt: str, template_kwargs: Mapping[str, Any]) -> ReasoningParser:
    enabled = template_kwargs.get("enable_thinking", True) is not False
    return ReasoningParser(in_reasoning=prompt.rstrip().endswith(START), enabled=enabled)


# --reasoning-parser NAME -> a factory of one sequence's parser from the rendered prompt
# and the request's chat_template_kwargs.
REASONING_PARSERS = {"deepseek_r1": _deepseek_r1, "qwen3": _qwen3}


def make_reasoning_parser(
    name: str, prompt: str, template_kwargs: Mapping[str, Any] | None
) -> ReasoningParser:
    factory = REASONING_PARSERS.get(name)
    if factory is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; accepted: {', '.join(sorted(REASONING_PARSERS))}"
        )
    return factory(prompt, template_kwargs or {})
