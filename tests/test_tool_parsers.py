"""Tool-call parsers on replies the tests write: whole, streamed a character at a time,
in random pieces and split at every position (markers cut across pieces); the deltas'
shape; refusals of what is not a call; and a time bound on pathological replies."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kvrun.server.chat_output import MessageStream, OutputPlan
from kvrun.server.reasoning import make_reasoning_parser
from kvrun.server.tool_parsers import (
    TOOL_PARSERS,
    ToolCallDelta,
    ToolParser,
    parse_all,
    tool_parser_class,
)
from kvrun.server.tool_parsers.forced import NamedToolParser, RequiredToolParser
from kvrun.server.tool_parsers.pythonic import python_call

Calls = list[tuple[str, Any]]  # (name, decoded arguments)


def _stream(parser: ToolParser, pieces: list[str]) -> tuple[str | None, list[list[str]]]:
    """Feed ``pieces``; (content, [[id, name, arguments]]), checking each delta's shape."""
    content = ""
    calls: list[list[str]] = []
    for i, piece in enumerate([*pieces, ""]):
        out = parser.feed(piece, final=i == len(pieces))
        content += out.content
        for delta in out.calls:
            assert isinstance(delta, ToolCallDelta)
            if delta.index == len(calls):  # a new call: its first delta has id and name
                assert delta.id and delta.name, delta
                calls.append([delta.id, delta.name, delta.arguments])
            else:
                assert delta.index < len(calls) and delta.id is None and delta.name is None
                calls[delta.index][2] += delta.arguments
    return content or None, calls


def _chunkings(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    out = [[text], list(text)]
    for _ in range(3):
        pieces, i = [], 0
        while i < len(text):
            step = rng.randint(1, 7)
            pieces.append(text[i : i + step])
            i += step
        out.append(pieces)
    return out


def _check(name: str, text: str, content: str | None, calls: Calls) -> None:
    whole = parse_all(tool_parser_class(name)(), text)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == calls
    assert len({c.id for c in whole.tool_calls}) == len(calls)
    expected = (whole.content, [[c.name, c.arguments] for c in whole.tool_calls])
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for pieces in _chunkings(text) + splits:
        got_content, got_calls = _stream(tool_parser_class(name)(), pieces)
        assert (got_content, [c[1:] for c in got_calls]) == expected, pieces


WEATHER: tuple[str, Any] = ("get_weather", {"city": "Paris", "days": 3})
NESTED: tuple[str, Any] = (
    "lookup",
    {"q": 'a "quoted" } ] string', "n": [1, -2.5, None, True, {"k": []}]},
)

CASES: list[tuple[str, str, str | None, Calls]] = [
    # hermes
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "days": 3}}\n</tool_call>',
        "Let me check.\n",
        [WEATHER],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
        '</tool_call>\n<tool_call>{"arguments": {"q": "a \\"quoted\\" } ] string", '
        '"n": [1, -2.5, null, true, {"k": []}]}, "name": "lookup"}</tool_call>',
        None,
        [WEATHER, NESTED],
    ),
    ("hermes", "No tools: 2 < 3; <tool is no marker.", "No tools: 2 < 3; <tool is no marker.", []),
    ("hermes", "<tool_call>not json</tool_call> done", "<tool_call>not json</tool_call> done", []),
    (
        "hermes",
        '<tool_call>{"name": "f", "parameters": {}}</tool_call> Done.',
        " Done.",
        [("f", {})],
    ),
    # llama3_json
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        None,
        [WEATHER],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}; '
        '{"name": "lookup", "parameters": {"q": "a \\"quoted\\" } ] string", '
        '"n": [1, -2.5, null, true, {"k": []}]}}',
        None,
        [WEATHER, NESTED],
    ),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", 'The answer is {"name": "x"}', 'The answer is {"name": "x"}', []),
    # mistral
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
        '{"name": "lookup", "arguments": {"q": "a \\"quoted\\" } ] string", '
        '"n": [1, -2.5, null, true, {"k": []}]}}]',
        "Sure. ",
        [WEATHER, NESTED],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]lookup[ARGS]'
        '{"q": "a \\"quoted\\" } ] string", "n": [1, -2.5, null, true, {"k": []}]}',
        None,
        [WEATHER, NESTED],
    ),
    ("mistral", "[TOOL_CALLS]no call here", "[TOOL_CALLS]no call here", []),
    ("mistral", "A [list] of [TOOL things]", "A [list] of [TOOL things]", []),
    # pythonic
    (
        "pythonic",
        '[get_weather(city="Paris", days=3), lookup(q=\'a "quoted" } ] string\', '
        'n=[1, -2.5, None, True, {"k": ()}])]',
        None,
        [WEATHER, NESTED],
    ),
    (
        "pythonic",
        '<|python_start|>[get_weather(city="""Paris""", days=+3)]<|python_end|>',
        None,
        [WEATHER],
    ),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    (
        "pythonic",
        "Call get_weather(city='x') yourself.",
        "Call get_weather(city='x') yourself.",
        [],
    ),
    ("pythonic", "[f(1)]", "[f(1)]", []),  # positional arguments are not a call
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parser_whole_and_streamed(name: str, text: str, content: str | None, calls: Calls) -> None:
    _check(name, text, content, calls)


def test_registry_names_the_vllm_parsers() -> None:
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(TOOL_PARSERS)
    for name in TOOL_PARSERS:
        assert issubclass(tool_parser_class(name), ToolParser)
    with pytest.raises(ValueError, match="accepted: hermes"):
        tool_parser_class("nope")


def test_streamed_arguments_arrive_in_pieces() -> None:
    """A call whose name comes first streams its arguments as they are written."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
    parser = tool_parser_class("hermes")()
    deltas = [d for ch in text for d in parser.feed(ch).calls]
    assert deltas[0].name == "get_weather" and deltas[0].arguments == "{"
    assert len(deltas) > 10
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris", "days": 3}'


def test_mistral_ids_are_nine_alphanumerics() -> None:
    out = parse_all(tool_parser_class("mistral")(), '[TOOL_CALLS]f[ARGS]{"a": 1}')
    (call,) = out.tool_calls
    assert len(call.id) == 9 and call.id.isalnum()
    given = parse_all(tool_parser_class("mistral")(), "[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{}")
    assert given.tool_calls[0].id == "abc123XYZ"


def test_pythonic_never_evaluates(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    for source in (
        f"f(a=open({str(canary)!r}, 'w'))",
        "f(a=__import__('os').getcwd())",
        "f(**{'a': 1})",
        "f(a=1 + 2)",
        "f(a=lambda: 1)",
        "f(a=1e999)",
        "os.system(a='x')",
    ):
        assert python_call(source) is None, source
    assert not canary.exists()
    assert python_call("f(a=[1, (2, 3)], b={'x': None}, c=-1)") == (
        "f",
        '{"a": [1, [2, 3]], "b": {"x": null}, "c": -1}',
    )


def test_required_and_named_outputs() -> None:
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}, '
        '{"name": "lookup", "parameters": {}}]'
    )
    for pieces in _chunkings(text):
        content, calls = _stream(RequiredToolParser(), pieces)
        assert content is None
        assert [(c[1], json.loads(c[2])) for c in calls] == [WEATHER, ("lookup", {})]
    args = '{"city": "Paris", "days": 3}'
    for pieces in _chunkings(args):
        content, calls = _stream(NamedToolParser("get_weather"), pieces)
        assert content is None and [c[1:] for c in calls] == [["get_weather", args]]


def test_message_stream_reads_tools_from_the_content_after_reasoning() -> None:
    text = (
        'Paris weather?</think>Checking.<tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Paris", "days": 3}}</tool_call>'
    )
    plan = OutputPlan(
        tool_parser=tool_parser_class("hermes"),
        reasoning_parser=lambda: make_reasoning_parser("deepseek_r1", "", None),
    )
    message = MessageStream(plan).message(text)
    assert message["reasoning_content"] == "Paris weather?"
    assert message["content"] == "Checking."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WEATHER[1]
    streamed = MessageStream(plan)
    fields: dict[str, str] = {"reasoning_content": "", "content": "", "arguments": ""}
    for i, ch in enumerate(text):
        delta = streamed.feed(ch, final=i == len(text) - 1)
        fields["reasoning_content"] += delta.get("reasoning_content", "")
        fields["content"] += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            fields["arguments"] += tc["function"]["arguments"]
    assert fields == {
        "reasoning_content": "Paris weather?",
        "content": "Checking.",
        "arguments": call["function"]["arguments"],
    }
    assert streamed.finish_reason("stop") == "tool_calls"
    assert streamed.finish_reason("length") == "length"


# Replies crafted to make a backtracking parser take exponential or quadratic time.
PATHOLOGICAL = [
    "[" * 100_000,
    "{" * 100_000,
    '{"name": "' + "a" * 100_000,
    '"' * 100_000,
    "\\" * 100_000,
    "<tool_call>" * 10_000,
    "<tool_call>{" * 10_000,
    "<tool_call>" + '{"name": "f", "arguments": ' + "[" * 50_000,
    "<|python_tag|>" + '{"name": "f", "parameters": {"a": "' + "\\" * 100_000,
    "[TOOL_CALLS]" * 10_000,
    "[TOOL_CALLS][" + '{"name": "f", "arguments": {' * 10_000,
    "[TOOL_CALLS]f[ARGS]" + "{" * 100_000,
    "[f(a=" + "(" * 100_000,
    "[f(a='" + "\\'" * 50_000,
    "[" + "f(a=1), " * 10_000,
    "[f(a='''" + "''" * 50_000,
    "[f(a=" + "1" * 100_000 + ")]",
]
BOUND_S = 2.0


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral", "pythonic", "required"])
@pytest.mark.parametrize("text", PATHOLOGICAL, ids=lambda t: f"{t[:16]!r}x{len(t)}")
def test_pathological_reply_returns_within_bound(name: str, text: str) -> None:
    def make() -> ToolParser:
        return RequiredToolParser() if name == "required" else tool_parser_class(name)()

    start = time.monotonic()
    parse_all(make(), text)
    assert time.monotonic() - start < BOUND_S
    start = time.monotonic()
    _stream(make(), [text[i : i + 1000] for i in range(0, len(text), 1000)])
    assert time.monotonic() - start < BOUND_S
