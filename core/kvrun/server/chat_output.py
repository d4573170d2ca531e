"""One chat reply's text as OpenAI's message: reasoning, content and tool calls.

The reasoning parser (``--reasoning-parser``) splits off ``reasoning_content`` first;
the tool parser then reads the content part. Both are fed the same pieces the engine
streams, or the whole reply at once, and give the same message either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvrun.server.reasoning import ReasoningParser
from kvrun.server.tool_parsers import ToolCallDelta, ToolParser

__all__ = ["MessageStream", "OutputPlan"]


@dataclass(frozen=True)
class OutputPlan:
    """How a request's replies become messages (one plan per request)."""

    tool_parser: Callable[[], ToolParser] | None = None  # None: content is plain text
    reasoning_parser: Callable[[], ReasoningParser] | None = None
    # finish_reason "stop" is reported as "tool_calls" when the reply made calls
    # (auto and required; a named function stays "stop", as OpenAI answers it)
    calls_finish: bool = True

    @property
    def plain(self) -> bool:
        return self.tool_parser is None and self.reasoning_parser is None


def _wire_call(delta: ToolCallDelta) -> dict[str, Any]:
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    return {
        "index": delta.index,
        "id": delta.id,
        "type": "function",
        "function": {"name": delta.name, "arguments": delta.arguments},
    }


class MessageStream:
    """One sequence's reply, fed a piece at a time."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self.tools = plan.tool_parser() if plan.tool_parser is not None else None
        self.reasoning = plan.reasoning_parser() if plan.reasoning_parser is not None else None

    def feed(self, text: str, final: bool) -> dict[str, Any]:
        """The delta fields this piece adds: content, reasoning_content, tool_calls."""
        delta: dict[str, Any] = {}
        content = text
        if self.reasoning is not None:
            split = self.reasoning.feed(text, final)
            if split.reasoning:
                delta["reasoning_content"] = split.reasoning
            content = split.content
        if self.tools is not None:
            parsed = self.tools.feed(content, final)
            content = parsed.content
            if parsed.calls:
                delta["tool_calls"] = [_wire_call(call) for call in parsed.calls]
        if content:
            delta["content"] = content
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.plan.calls_finish and self.tools and self.tools.num_calls:
            return "tool_calls"
        return reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole reply as a message (a fresh stream, fed once)."""
        if self.plan.plain:
            return {"role": "assistant", "content": text}
        delta = self.feed(text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content") or None}
        if self.reasoning is not None:
            message["reasoning_content"] = delta.get("reasoning_content") or None
        calls: list[dict[str, Any]] = []
        for call in delta.get("tool_calls", []):
            if "id" in call:
                calls.append(call)
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return message
