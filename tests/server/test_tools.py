"""Tool calling and reasoning output through the real `openai` client against a real
`kvrun serve --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`.

The 135M test model writes no tool calls by itself: required and named calls are held
to the tools' schema by structured output, and a hermes call under tool_choice auto is
made with a regex constraint, so the parser reads real generated text, whole and
streamed. Parsers on constructed replies: tests/test_tool_parsers.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import jsonschema
import pytest

from kvrun.server.config import ServerConfig
from kvrun.server.protocol import ChatCompletionRequest
from kvrun.server.tools import ToolPlan, plan_tools
from tests.server.conftest import Server, kvrun_runs

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the default model is served as
PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": PARAMETERS,
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris for the next two days?"}]
# A template that shows what it was given: the tools and the history's tool calls.
ECHO_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} city={{ c.function.arguments.city }}]"
    "{% endfor %}\n{% endfor %}assistant:"
)
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)


def _post(server: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    with server.http() as http:
        answer = http.post("/v1/chat/completions", json=body)
    return answer.status_code, answer.json()


def _assert_alive(server: Server) -> None:
    status, body = _post(server, {"messages": ASK, "max_tokens": 2})
    assert status == 200, body


def _refused(server: Server, body: dict[str, Any], param: str, *words: str) -> None:
    status, answer = _post(server, {"messages": ASK, "max_tokens": 4, **body})
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    for word in (param, *words):
        assert word in error["message"], error


def test_auto_without_the_flags_names_them(server: Server) -> None:
    flags = ("--enable-auto-tool-choice", "--tool-call-parser")
    _refused(server, {"tools": TOOLS}, "tools", *flags)
    _refused(server, {"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", *flags)
    status, body = _post(
        server, {"messages": ASK, "max_tokens": 2, "tools": TOOLS, "tool_choice": "none"}
    )
    assert status == 200 and "tool_calls" not in body["choices"][0]["message"], body
    _assert_alive(server)


BAD_TOOLS: list[tuple[dict[str, Any], str, tuple[str, ...]]] = [
    ({"tools": [{"type": "retrieval"}]}, "tools", ("tools[0].type", "'function'")),
    ({"tools": [{"type": "function"}]}, "tools", ("tools[0]",)),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools", ("name",)),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", ("letters",)),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools", ("twice",)),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
        "tools",
        ("JSON schema",),
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "argz": {}}}]},
        "tools",
        ("argz",),
    ),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ("'required'",)),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", ("'none'",)),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "tool_choice",
        ("'fly'", "get_weather"),
    ),
    ({"tool_choice": "required"}, "tool_choice", ("needs tools",)),
    (
        {
            "tools": TOOLS,
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "tool_choice",
        ("response_format",),
    ),
    (
        {
            "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}],
        },
        "messages",
        ("messages[0].tool_calls[0]",),
    ),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_TOOLS)
def test_bad_tool_fields_are_400s(
    tools_server: Server, body: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    _refused(tools_server, body, param, *words)
    _assert_alive(tools_server)


def _prompt_tokens(server: Server, text: str) -> int:
    with server.http() as http:
        answer = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    count: int = answer.json()["count"]
    return count


def test_the_template_receives_tools_and_tool_call_history(tools_server: Server) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client = tools_server.client()
    out = client.chat.completions.create(  # type: ignore[call-overload]
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=1,
        extra_body={"chat_template": ECHO_TEMPLATE},
    )
    # (a newline after a block tag is dropped: templates render with trim_blocks)
    expected = (
        "TOOLS:get_weather;now;user:Weather?assistant:[get_weather city=Oslo]tool:sunnyassistant:"
    )
    assert out.usage is not None
    assert out.usage.prompt_tokens == _prompt_tokens(tools_server, expected)


def _stream_message(server: Server, **kwargs: Any) -> tuple[Any, list[Any]]:
    """The openai client's stream helper: (final completion, chunks' deltas)."""
    deltas = []
    with server.client().chat.completions.stream(model=MODEL, **kwargs) as stream:
        for event in stream:
            if event.type == "chunk" and event.chunk.choices:
                deltas.append(event.chunk.choices[0].delta)
        final = stream.get_final_completion()
    return final, deltas


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


HERMES_CALL = (
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}</tool_call>'
)


def test_auto_reads_a_hermes_call_whole_and_streamed(tools_server: Server) -> None:
    # a regex holds the model to a hermes reply: the parser reads real output
    kwargs: dict[str, Any] = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "auto",
        "max_tokens": 80,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"regex": "Checking\\. " + re.escape(HERMES_CALL)}},
    }
    whole = tools_server.client().chat.completions.create(model=MODEL, **kwargs)
    choice = whole.choices[0]
    assert choice.message.content == "Checking. "
    assert _calls(choice.message) == [("get_weather", {"city": "Rome", "days": 2})]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].id.startswith("call_")
    final, deltas = _stream_message(tools_server, **kwargs)
    assert final.choices[0].message.content == "Checking. "
    assert _calls(final.choices[0].message) == _calls(choice.message)
    assert final.choices[0].finish_reason == "tool_calls"
    # OpenAI's delta shape: the first names the call, the later ones add arguments
    tool_deltas = [tc for d in deltas for tc in d.tool_calls or []]
    assert tool_deltas[0].id and tool_deltas[0].type == "function"
    assert tool_deltas[0].function.name == "get_weather"
    assert all(tc.index == 0 and tc.id is None for tc in tool_deltas[1:])
    assert len(tool_deltas) > 2  # the arguments arrived in pieces
    joined = "".join(tc.function.arguments or "" for tc in tool_deltas)
    assert joined == choice.message.tool_calls[0].function.arguments


def test_auto_without_a_call_is_plain_content(tools_server: Server) -> None:
    out = tools_server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")


def _assert_valid_calls(message: Any) -> None:
    assert message.tool_calls
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, PARAMETERS)
        else:
            assert call.function.name == "now" and isinstance(arguments, dict)


def test_required_is_enforced(tools_server: Server) -> None:
    kwargs: dict[str, Any] = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 60,
        "temperature": 0,
    }
    # This model, held to the array, keeps adding calls until max_tokens: each complete
    # one parses and fits its schema; the one cut off is not a call.
    cut = tools_server.client().chat.completions.create(model=MODEL, **kwargs)
    assert cut.choices[0].finish_reason == "length"
    _assert_valid_calls(cut.choices[0].message)
    # A stop string between calls ends the array after the first one.
    kwargs["stop"] = [', {"name"']
    whole = tools_server.client().chat.completions.create(model=MODEL, **kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    assert len(choice.message.tool_calls or []) == 1
    _assert_valid_calls(choice.message)
    final, _ = _stream_message(tools_server, **kwargs)
    assert _calls(final.choices[0].message) == _calls(choice.message)
    assert final.choices[0].finish_reason == "tool_calls"
    # parallel_tool_calls=False holds the array to one call: it ends by itself
    del kwargs["stop"]
    single = tools_server.client().chat.completions.create(
        model=MODEL, parallel_tool_calls=False, **kwargs
    )
    assert single.choices[0].finish_reason == "tool_calls", single
    assert _calls(single.choices[0].message) == _calls(choice.message)


def test_named_function_is_enforced(tools_server: Server) -> None:
    kwargs: dict[str, Any] = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 100,
        "temperature": 0,
    }
    whole = tools_server.client().chat.completions.create(model=MODEL, **kwargs)
    choice = whole.choices[0]
    assert choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls or []] == ["get_weather"]
    _assert_valid_calls(choice.message)
    assert choice.finish_reason == "stop"  # as OpenAI answers a named tool_choice
    final, deltas = _stream_message(tools_server, **kwargs)
    assert _calls(final.choices[0].message) == _calls(choice.message)
    assert not any(d.content for d in deltas)


def test_reasoning_split_whole_and_streamed(tools_server: Server) -> None:
    client = tools_server.client()
    base: dict[str, Any] = {
        "messages": ASK,
        "max_tokens": 24,
        "temperature": 0,
    }
    # the prompt opens <think>: qwen3 reads the reply as reasoning
    thinking = client.chat.completions.create(
        model=MODEL, **base, extra_body={"chat_template": THINKING_TEMPLATE}
    )
    message = thinking.choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning and message.content is None
    chunks = client.chat.completions.create(
        model=MODEL, stream=True, **base, extra_body={"chat_template": THINKING_TEMPLATE}
    )
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in chunks:
        if chunk.choices:
            delta = chunk.choices[0].delta
            streamed["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
            streamed["content"] += delta.content or ""
    assert streamed == {"reasoning_content": reasoning, "content": ""}
    # enable_thinking false: the same reply (same prompt) is content
    plain = client.chat.completions.create(
        model=MODEL,
        **base,
        extra_body={
            "chat_template": THINKING_TEMPLATE,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert plain.choices[0].message.content == reasoning
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
    # the model's own template opens no <think>: content, reasoning_content null
    default = client.chat.completions.create(model=MODEL, **base)
    assert default.choices[0].message.content
    assert getattr(default.choices[0].message, "reasoning_content", "absent") is None


FLAG_ERRORS: list[tuple[list[str], tuple[str, ...]]] = [
    (["--enable-auto-tool-choice"], ("--tool-call-parser", "hermes")),
    (["--tool-call-parser", "nope"], ("'nope'", "llama3_json", "mistral", "pythonic")),
    (["--tool-parser-plugin", str(Path("p.py"))], ("--tool-parser-plugin", "plugins")),
    (["--reasoning-parser", "granite"], ("'granite'", "deepseek_r1", "qwen3")),
]


@pytest.fixture(scope="module")
def flag_errors() -> Iterator[dict[str, Future[CompletedProcess[str]]]]:
    """`kvrun serve` with each of FLAG_ERRORS' flags, two at a time in the background."""
    with kvrun_runs({" ".join(args): (["serve", *args], {}) for args, _ in FLAG_ERRORS}) as runs:
        yield runs


@pytest.mark.parametrize(("args", "words"), FLAG_ERRORS)
def test_serve_flag_errors(
    flag_errors: dict[str, Future[CompletedProcess[str]]],
    args: list[str],
    words: tuple[str, ...],
) -> None:
    done = flag_errors[" ".join(args)].result()
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, last


def test_tool_plans_and_their_schemas() -> None:
    def plan(config: ServerConfig, **body: Any) -> ToolPlan:
        return plan_tools(ChatCompletionRequest.model_validate({"messages": ASK, **body}), config)

    config = ServerConfig()
    assert plan(config, tools=TOOLS, tool_choice="none").tools == TOOLS
    excluded = ServerConfig(exclude_tools_when_tool_choice_none=True)
    assert plan(excluded, tools=TOOLS, tool_choice="none").tools is None
    auto = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert plan(auto, tools=TOOLS).mode == "auto"
    required = plan(config, tools=TOOLS, tool_choice="required")
    assert required.constraint is not None and required.constraint.disable_any_whitespace
    assert json.loads(required.constraint.source) == {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": parameters,
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, parameters in (
                    ("get_weather", PARAMETERS),
                    ("now", {"type": "object", "properties": {}}),
                )
            ]
        },
    }
    named = plan(
        config, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert named.mode == "named" and named.function == "get_weather"
    assert named.constraint is not None and json.loads(named.constraint.source) == PARAMETERS
