"""Structured output through the real `openai` client against a real `kvrun serve`.

Every constrained reply must conform (a json_schema reply parses and validates against
its schema); every malformed constraint is a 400 naming the field the client used, and
the server goes on answering.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import Server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
SCHEMAS = {
    "person": PERSON,
    "enum-and-bool": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
        },
        "required": ["color", "ok"],
    },
    "array-of-numbers": {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 2,
        "maxItems": 4,
    },
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def _response_format(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_replies_validate(
    server: Server, model_name: str, name: str, stream: bool
) -> None:
    schema = SCHEMAS[name]
    client = server.client()
    kwargs = dict(
        model=model_name,
        messages=MESSAGES,
        max_tokens=200,
        temperature=0.7,
        seed=3,
        response_format=_response_format(schema),
    )
    if stream:
        chunks = client.chat.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
        parts, finish = [], None
        for chunk in chunks:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        text = "".join(parts)
    else:
        out = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_is_an_object(server: Server, model_name: str) -> None:
    out = server.client().chat.completions.create(
        model=model_name,
        messages=[
            {"role": "user", "content": "Give a JSON object with keys x and y, both numbers."}
        ],
        max_tokens=120,
        temperature=0.0,
        response_format={"type": "json_object"},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        (
            "guided_regex",
            r"[A-Z][a-z]{2,8} \d{2}",
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} \d{2}", t),
        ),
        ("guided_choice", ["alpha", "beta", "gamma"], lambda t: t in {"alpha", "beta", "gamma"}),
        (
            "guided_grammar",
            'root ::= "(" num (", " num)* ")"\nnum ::= [1-9] [0-9]?',
            lambda t: re.fullmatch(r"\([1-9][0-9]?(, [1-9][0-9]?)*\)", t),
        ),
        (
            "guided_json",
            json.dumps(PERSON),
            lambda t: jsonschema.validate(json.loads(t), PERSON) or True,
        ),
    ],
)
def test_vllm_guided_fields_on_completions(
    server: Server, model_name: str, field: str, value: object, check: object
) -> None:
    out = server.client().completions.create(
        model=model_name,
        prompt="Answer:",
        max_tokens=150,
        temperature=0.9,
        seed=11,
        n=2,
        extra_body={field: value},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.text
        assert check(choice.text), choice.text  # type: ignore[operator]


@pytest.mark.parametrize(
    ("kind", "value", "pattern"),
    [
        ("regex", r"(yes|no), because [a-z ]{5,30}\.", r"(yes|no), because [a-z ]{5,30}\."),
        ("choice", ["left", "right"], r"left|right"),
        ("grammar", 'root ::= "x" [0-9] [0-9]? [0-9]? "y"', r"x[0-9]{1,3}y"),
    ],
)
def test_structured_outputs_field_on_chat(
    server: Server, model_name: str, kind: str, value: object, pattern: str
) -> None:
    out = server.client().chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Pick one."}],
        max_tokens=60,
        temperature=0.0,
        extra_body={"structured_outputs": {kind: value}},
    )
    text = out.choices[0].message.content or ""
    assert re.fullmatch(pattern, text), text


def test_constrained_and_free_requests_share_batches(server: Server, model_name: str) -> None:
    """Greedy replies are the same whether or not a constrained request runs beside them."""
    client = server.client()
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]

    def free(prompt: str) -> str:
        out = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=24, temperature=0.0
        )
        return out.choices[0].text

    alone = [free(p) for p in prompts]
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(6) as pool:
        constrained = [
            pool.submit(
                client.completions.create,
                model=model_name,
                prompt="JSON:",
                max_tokens=100,
                temperature=0.0,
                extra_body={"guided_json": PERSON},
            )
            for _ in range(3)
        ]
        together = [pool.submit(free, p) for p in prompts]
        assert [f.result() for f in together] == alone
        for f in constrained:
            jsonschema.validate(json.loads(f.result().choices[0].text), PERSON)


def test_an_empty_schema_ends_by_max_tokens(server: Server, model_name: str) -> None:
    out = server.client().chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=40,
        temperature=1.0,
        seed=5,
        response_format=_response_format({}),
    )
    choice = out.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert out.usage is not None and out.usage.completion_tokens <= 40
    if choice.finish_reason == "stop":
        json.loads(choice.message.content or "")


def _deep_schema(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _deep_schema_text(depth: int) -> str:
    """The same, as JSON text, built without recursion (json.dumps would exhaust the stack)."""
    head = '{"type": "object", "required": ["a"], "properties": {"a": '
    return head * depth + '{"type": "string"}' + "}}" * depth


BAD = [
    ("response_format", {"response_format": _response_format({"type": "foo"})}, "foo"),
    ("response_format", {"response_format": {"type": "yaml"}}, "json_schema"),
    ("response_format", {"response_format": {"type": "json_schema"}}, "json_schema"),
    ("guided_json", {"guided_json": _deep_schema(200)}, "nested at most"),
    ("guided_json", {"guided_json": _deep_schema_text(3000)}, "guided_json"),
    ("guided_regex", {"guided_regex": "foo**"}, "repetition"),
    ("guided_regex", {"guided_regex": "(a+)+$"}, "nested unbounded repetition"),
    ("structured_outputs", {"structured_outputs": {"regex": "(a|b+)*"}}, "nested"),
    ("structured_outputs", {"structured_outputs": {"grammar": "root ::= "}}, "EBNF"),
    ("structured_outputs", {"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one"),
    ("structured_outputs", {"structured_outputs": {"pattern": "a"}}, "unknown key"),
    ("guided_choice", {"guided_choice": []}, "non-empty"),
    ("guided_regex", {"guided_json": {}, "guided_regex": "a"}, "at most one"),
    (
        "guided_decoding_backend",
        {"guided_decoding_backend": "outlines", "guided_regex": "a"},
        "xgrammar",
    ),
    (
        "guided_whitespace_pattern",
        {"guided_whitespace_pattern": "[ ]?"},
        "JSON constraint",
    ),
]


@pytest.mark.parametrize(
    ("param", "body", "words"), BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)]
)
def test_bad_constraints_are_400s_naming_the_field(
    server: Server, model_name: str, param: str, body: dict[str, object], words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=4, extra_body=body
        )
    error = caught.value.body
    assert isinstance(error, dict), error
    assert error.get("param") == param, error
    assert words in error["message"], error
    # the engine is alive and answers the next request
    out = server.client().completions.create(model=model_name, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None
