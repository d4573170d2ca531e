"""Tool-call parsers: a model's reply text to OpenAI's ``tool_calls``, whole or streamed.

:data:`TOOL_PARSERS` names each format (``--tool-call-parser``) and the class that reads
it, imported on first use. The contract is in :mod:`kvrun.server.tool_parsers.base`.
"""

from __future__ import annotations

import importlib

from kvrun.server.tool_parsers.base import (
    ParsedOutput,
    ParserDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    parse_all,
)

__all__ = [
    "TOOL_PARSERS",
    "ParsedOutput",
    "ParserDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "parse_all",
    "tool_parser_class",
]

# --tool-call-parser NAME -> "module:Class" (vLLM's names; the llama4 ones read the same).
TOOL_PARSERS: dict[str, str] = {
    "hermes": "kvrun.server.tool_parsers.hermes:HermesToolParser",
    "llama3_json": "kvrun.server.tool_parsers.llama3_json:Llama3JsonToolParser",
    "llama4_json": "kvrun.server.tool_parsers.llama3_json:Llama3JsonToolParser",
    "mistral": "kvrun.server.tool_parsers.mistral:MistralToolParser",
    "pythonic": "kvrun.server.tool_parsers.pythonic:PythonicToolParser",
    "llama4_pythonic": "kvrun.server.tool_parsers.pythonic:PythonicToolParser",
}


def tool_parser_class(name: str) -> type[ToolParser]:
    """The parser registered as ``name``; ValueError naming the accepted ones."""
    target = TOOL_PARSERS.get(name)
    if target is None:
        raise ValueError(
            f"unknown tool call parser {name!r}; accepted: {', '.join(sorted(TOOL_PARSERS))}"
        )
    module, _, attr = target.partition(":")
    cls: type[ToolParser] = getattr(importlib.import_module(module), attr)
    return cls
