"""A chat request's ``tools`` and ``tool_choice``, checked, and what they ask of the reply.

OpenAI's shapes: ``tools`` is a list of ``{"type": "function", "function": {"name",
"description"?, "parameters"? (a JSON schema object), "strict"?}}``; ``tool_choice`` is
``"none"``, ``"auto"`` (the default when tools are given), ``"required"`` or
``{"type": "function", "function": {"name": ...}}``.

- ``auto`` reads calls out of free text with the server's ``--tool-call-parser``
  (only with ``--enable-auto-tool-choice``, as vLLM has it);
- ``required`` and a named function are enforced by structured output: the reply is
  held to a JSON schema (an array of ``{"name", "parameters"}`` for required, the
  function's parameters object for a named one), so the arguments always parse.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from kvrun.errors import RequestError
from kvrun.server.config import ServerConfig
from kvrun.server.errors import ApiError
from kvrun.server.params import api_error
from kvrun.server.protocol import ChatCompletionRequest
from kvrun.server.structured import CHECK_TIMEOUT_S
from kvrun.structured_output import StructuredOutputsParams
from kvrun.structured_output.compiler import check_constraint

__all__ = [
    "MAX_TOOLS",
    "ToolPlan",
    "check_tool_constraint",
    "plan_tools",
    "template_tool_calls",
]

MAX_TOOLS = 128  # OpenAI's cap on tools per request
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_CHOICES = "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tool fields ask for, checked."""

    mode: ToolMode
    tools: list[dict[str, Any]] | None  # for the chat template (None: no tools given)
    function: str | None = None  # the named function (mode "named")
    constraint: StructuredOutputsParams | None = None  # required / named: the reply's schema


def _bad(param: str, message: str) -> ApiError:
    return ApiError(message, 400, param=param)


def _check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tool's parameters schema by function name; a 400 naming the first bad tool."""
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"tools has {len(tools)} entries; accepted: at most {MAX_TOOLS}")
    shape = "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if tool.get("type") != "function":
            raise _bad(
                "tools", f"{where}.type is {tool.get('type')!r}; accepted: 'function' ({shape})"
            )
        function = tool.get("function")
        extra = sorted(set(tool) - {"type", "function"})
        if not isinstance(function, dict) or extra:
            raise _bad("tools", f"{where} must be {shape}; got {json.dumps(tool)[:200]}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad(
                "tools",
                f"{where}.function.name is {name!r}; accepted: 1 to 64 letters, digits, "
                "underscores or dashes",
            )
        if name in schemas:
            raise _bad("tools", f"{where}.function.name {name!r} is given twice")
        unknown = sorted(set(function) - _FUNCTION_KEYS)
        if unknown:
            raise _bad(
                "tools",
                f"{where}.function has the unknown field {unknown[0]!r}; accepted: "
                f"{', '.join(sorted(_FUNCTION_KEYS))}",
            )
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad("tools", f"{where}.function.description must be a string")
        if not isinstance(function.get("strict", False), bool):
            raise _bad("tools", f"{where}.function.strict must be true or false")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise _bad(
                "tools",
                f"{where}.function.parameters must be a JSON schema object; got "
                f"{json.dumps(parameters)[:200]}",
            )
        schemas[name] = parameters or _NO_PARAMETERS
    return schemas


def _named(choice: dict[str, Any]) -> str:
    function = choice.get("function")
    if (
        choice.get("type") != "function"
        or set(choice) != {"type", "function"}
        or not isinstance(function, dict)
        or set(function) != {"name"}
        or not isinstance(function["name"], str)
    ):
        raise _bad("tool_choice", f"tool_choice {json.dumps(choice)[:200]} is not {_CHOICES}")
    name: str = function["name"]
    return name


def _constraint(schema: dict[str, Any], param: str) -> StructuredOutputsParams:
    # Compact JSON: the reply is for a program, and a small model left free to add
    # whitespace can spend its whole budget on newlines inside the array.
    try:
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    except RequestError as exc:
        raise api_error(exc, {"structured_outputs.json": param}) from None


def plan_tools(req: ChatCompletionRequest, config: ServerConfig) -> ToolPlan:
    """Check ``tools`` and ``tool_choice``; a 400 naming the field at fault."""
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise _bad("tool_choice", f"tool_choice {choice!r} is not {_CHOICES}")
    schemas = _check_tools(req.tools) if req.tools else {}
    if not schemas:
        if choice in (None, "none"):
            return ToolPlan("none", req.tools)
        raise _bad(
            "tool_choice",
            f"tool_choice {json.dumps(choice)} needs tools; give tools or set tool_choice "
            "to 'none'",
        )
    if choice == "none":
        return ToolPlan("none", None if config.exclude_tools_when_tool_choice_none else req.tools)
    if choice is None or choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise _bad(
                "tool_choice" if choice is not None else "tools",
                'tool_choice "auto" (the default when tools are given) needs the server '
                "started with --enable-auto-tool-choice and --tool-call-parser NAME; "
                "otherwise send tool_choice 'required', a named function, or 'none'",
            )
        return ToolPlan("auto", req.tools)
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, parameters in schemas.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if req.parallel_tool_calls is False:  # OpenAI's switch: at most one call per reply
            schema["maxItems"] = 1
        return ToolPlan("required", req.tools, constraint=_constraint(schema, "tools"))
    assert isinstance(choice, dict)
    name = _named(choice)
    if name not in schemas:
        raise _bad(
            "tool_choice",
            f"tool_choice names the function {name!r}, which is not in tools; accepted: "
            f"{', '.join(sorted(schemas))}",
        )
    return ToolPlan("named", req.tools, name, _constraint(schemas[name], "tools"))


def template_tool_calls(calls: object, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` for the chat template: checked, with each
    call's ``arguments`` JSON text decoded into an object, as templates read them."""
    shape = "[{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': ...}}]"
    if not isinstance(calls, list):
        raise _bad("messages", f"{where}.tool_calls must be a list: {shape}")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad("messages", f"{where}.tool_calls[{i}] must be shaped as in {shape}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except (ValueError, RecursionError):
                decoded = None
            if isinstance(decoded, dict):
                arguments = decoded
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


async def check_tool_constraint(plan: ToolPlan) -> StructuredOutputsParams | None:
    """The plan's constraint compiled once here (a time bound, in a worker thread), so a
    parameters schema the grammar compiler refuses is a 400 naming tools."""
    if plan.constraint is None:
        return None
    try:
        await asyncio.wait_for(
            asyncio.to_thread(check_constraint, plan.constraint), CHECK_TIMEOUT_S
        )
    except RequestError as exc:
        raise api_error(exc.renamed("tools")) from None
    except TimeoutError:
        raise _bad(
            "tools",
            f"the tools' parameters schemas did not compile to a grammar within "
            f"{CHECK_TIMEOUT_S:.0f} s; accepted: smaller schemas",
        ) from None
    return plan.constraint
