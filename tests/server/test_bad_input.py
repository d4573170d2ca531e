"""Every bad input gets OpenAI's error envelope naming the field, and never disturbs
a request running beside it."""

from __future__ import annotations

import threading
import time
from typing import Any

import openai
import pytest

from kvrun.errors import RequestError
from kvrun.sampling_params import SamplingParams
from tests.server.conftest import Server

OK = {"prompt": "Hi", "max_tokens": 2}
MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": MESSAGES, "max_tokens": 2}

# (route, body, status, param, code)
CASES: list[tuple[str, dict[str, Any], int, str | None, str | int | None]] = [
    ("/v1/completions", {**OK, "model": "no-such-model"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt", 400),
    ("/v1/completions", {**OK, "n": 0}, 400, "n", 400),
    ("/v1/completions", {**OK, "n": 17}, 400, "n", 400),
    ("/v1/chat/completions", {**CHAT, "n": 17}, 400, "n", 400),
    ("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens", 400),
    ("/v1/completions", {**OK, "max_tokens": -5}, 400, "max_tokens", 400),
    (
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        400,
    ),
    (
        "/v1/completions",
        {**OK, "max_tokens": 1024},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "max_tokens": 1024},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/completions", {"prompt": [1] * 1024}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1, 2, 49152]}, 400, "prompt", 400),
    ("/v1/completions", {"prompt": [[1, 2], [1, 10**9]]}, 400, "prompt", 400),
    ("/v1/completions", {"prompt": [1, -1]}, 400, "prompt", 400),
    ("/v1/completions", {"prompt": []}, 400, "prompt", 400),
    ("/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", 400),
    ("/v1/completions", {**OK, "logprobs": -1}, 400, "logprobs", 400),
    (
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        400,
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", 400),
    ("/v1/completions", {**OK, "stop": [f"s{i}" for i in range(17)]}, 400, "stop", 400),
    ("/v1/completions", {**OK, "stop": "x" * 257}, 400, "stop", 400),
    ("/v1/completions", {**OK, "stop": [""]}, 400, "stop", 400),
    ("/v1/completions", {**OK, "logit_bias": {"49152": 1.0}}, 400, "logit_bias", 400),
    ("/v1/completions", {**OK, "logit_bias": {"abc": 1.0}}, 400, "logit_bias", 400),
    ("/v1/completions", {**OK, "logit_bias": {"5": 100.5}}, 400, "logit_bias", 400),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": -101}}, 400, "logit_bias", 400),
    ("/v1/completions", {**OK, "temperature": -0.5}, 400, "temperature", 400),
    ("/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature", 400),
    ("/v1/completions", {**OK, "top_p": 0.0}, 400, "top_p", 400),
    ("/v1/completions", {**OK, "top_p": 1.5}, 400, "top_p", 400),
    ("/v1/completions", {**OK, "max_tokens": "3"}, 400, "max_tokens", 400),
    ("/v1/completions", {**OK, "seed": 2**70}, 400, "seed", 400),
    ("/v1/completions", {**OK, "stop_token_ids": [49152]}, 400, "stop_token_ids", 400),
    ("/v1/completions", {**OK, "best_of": 3}, 400, "best_of", 400),
    ("/v1/completions", {**OK, "suffix": "x"}, 400, "suffix", 400),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", 400),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0]",  # a text-only model: "does not accept image inputs"
        400,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
        400,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "chat_template_kwargs": {"messages": []}},
        400,
        "chat_template_kwargs",
        400,
    ),
    ("/detokenize", {"tokens": [49152]}, 400, "tokens", 400),
    ("/tokenize", {}, 400, "prompt", 400),
]


@pytest.mark.parametrize(("route", "body", "status", "param", "code"), CASES)
def test_bad_input(
    server: Server,
    route: str,
    body: dict[str, Any],
    status: int,
    param: str | None,
    code: str | int | None,
) -> None:
    with server.http() as http:
        answer = http.post(route, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    if param is not None and status == 400:
        assert param in error["message"] or param == "prompt"


def test_messages_name_the_field_and_what_is_accepted(server: Server) -> None:
    with server.http() as http:
        n = http.post("/v1/completions", json={**OK, "n": 17}).json()["error"]["message"]
        top_p = http.post("/v1/completions", json={**OK, "top_p": 1.5}).json()["error"]["message"]
        vocab = http.post("/v1/completions", json={"prompt": [1, 49152]}).json()["error"]["message"]
    assert n == "n=17 is invalid; accepted: an int in [1, 16] (--max-n)"
    assert top_p == "top_p=1.5 is invalid; accepted: a float in (0, 1]"
    assert vocab == "prompt holds token id 49152, outside the vocabulary [0, 49152)"


# (request field, value, the SamplingParams keyword the route maps it to)
ONE_PATH = [
    ("top_k", -5, "top_k"),
    ("min_p", 1.5, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("seed", 2**70, "seed"),
    ("stop_token_ids", [49152], "stop_token_ids"),
    ("bad_words", [""], "bad_words"),
    ("logit_bias", {"\u00b2": 1.0}, "logit_bias"),
    ("top_logprobs", 21, "logprobs"),
]


def test_the_server_and_the_offline_api_refuse_alike(server: Server) -> None:
    # One validation path: the 400's message is what SamplingParams (and its verify)
    # raise offline, in the route's spelling of the field.
    for field, value, keyword in ONE_PATH:
        body = {**CHAT, field: value, **({"logprobs": True} if field == "top_logprobs" else {})}
        with server.http() as http:
            error = http.post("/v1/chat/completions", json=body).json()["error"]
        with pytest.raises(RequestError) as offline:
            SamplingParams(**{keyword: value}).verify(49152, 20)
        assert error["param"] == field
        assert error["message"] == str(offline.value.renamed(field)), field


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": ', "the request body is not valid JSON: Expecting value: line 1 column 12"),
        (b"[1, 2]", "the request body must be a JSON object, got list"),
        (b'"text"', "the request body must be a JSON object, got str"),
        (b"\xff\xfe", "the request body is not valid JSON"),
    ],
)
def test_malformed_bodies(server: Server, raw: bytes, message: str) -> None:
    with server.http() as http:
        answer = http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"].startswith(message)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, 400)


HOSTILE = [
    (b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", "the request body nests JSON"),
    (b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "the request body holds a value"),
    (b'{"prompt": "a\\ud800b", "messages": [{"role": "user", "content": "\\ud800"}]}', ""),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize(("raw", "message"), HOSTILE)
def test_hostile_bodies_get_a_400_and_the_connection_lives(
    server: Server, route: str, raw: bytes, message: str
) -> None:
    with server.http() as http:
        answer = http.post(route, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["message"].startswith(message or "the request body holds a string that")
        # The same keep-alive connection still answers.
        assert http.get("/health").status_code == 200


def test_a_huge_n_is_refused_at_once_before_any_work(server: Server) -> None:
    with server.http() as http:
        for n in (10**9, 2**63):
            start = time.monotonic()
            error = http.post("/v1/completions", json={**OK, "n": n}).json()["error"]
            assert time.monotonic() - start < 1.0
            assert (error["param"], error["message"]) == (
                "n",
                f"n={n} is invalid; accepted: an int in [1, 16] (--max-n)",
            )
        many = http.post("/v1/completions", json={**OK, "prompt": ["Hi"] * 1000, "n": 16})
        assert many.json()["error"]["message"] == (
            "1000 prompts x n=16 is 16000 sequences; accepted: at most 256 in one request "
            "(--max-sequences-per-request)"
        )
        assert http.post("/v1/completions", json=OK).status_code == 200


def test_over_long_header(server: Server) -> None:
    with server.http() as http:
        answer = http.get("/v1/models", headers={"x-padding": "a" * 20000})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "header_too_large"


def test_over_size_body(server: Server) -> None:
    with server.http() as http:
        answer = http.post("/v1/completions", content=b"x" * (8 * 1024 * 1024 + 1))
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "body_too_large"
    assert error["message"] == (
        "request body is 8388609 bytes; the limit is 8388608 bytes (--max-request-body-bytes)"
    )


def test_unknown_route_and_method(server: Server) -> None:
    with server.http() as http:
        missing = http.get("/v1/nothing")
        method = http.get("/v1/completions")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert method.status_code == 405
    assert method.json()["error"]["message"] == "method GET is not allowed on /v1/completions"


def test_request_chat_templates_are_refused_unless_trusted(server: Server) -> None:
    refusals = [
        ("/v1/chat/completions", {**CHAT, "chat_template": "{{1}}"}),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"chat_template": "{{1}}"}}),
        ("/tokenize", {"messages": MESSAGES, "chat_template": "{{1}}"}),
    ]
    with server.http() as http:
        for route, body in refusals:
            error = http.post(route, json=body).json()["error"]
            assert error["param"] == "chat_template", route
            assert error["message"].startswith("chat_template in a request is refused")
            assert "--trust-request-chat-template" in error["message"]
        # The render's own argument names are not template variables.
        error = http.post(
            "/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"self": 1}}
        ).json()["error"]
        assert error == {
            "message": "chat_template_kwargs may not set self; use the request fields",
            "type": "invalid_request_error",
            "param": "chat_template_kwargs",
            "code": 400,
        }


def test_a_trusted_request_template_runs_sandboxed_and_bounded(tools_server: Server) -> None:
    srv = tools_server  # --trust-request-chat-template (and tool parsers, unused here)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    big = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    cases = [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the chat template tried an unsafe"),
        (slow, "the chat template took longer than 5 s to render"),
        (big, "the chat template rendered more than 16777216 characters"),
        ("{{ 1/0 }}", "the chat template failed to render: ZeroDivisionError"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template recursed"),
    ]
    with srv.http() as http:
        for template, message in cases:
            start = time.monotonic()
            answer = http.post("/v1/chat/completions", json={**CHAT, "chat_template": template})
            assert time.monotonic() - start < 15
            error = answer.json()["error"]
            assert (answer.status_code, error["param"]) == (400, "chat_template"), template
            assert error["message"].startswith(message), error["message"]
        fine = {**CHAT, "chat_template": "{{ messages[0]['content'] }}"}
        assert http.post("/v1/chat/completions", json=fine).status_code == 200
        assert http.get("/health").status_code == 200


def test_openai_client_raises_with_the_envelope(server: Server, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=model_name, prompt="Hi", max_tokens=1, n=0)
    assert info.value.status_code == 400
    assert info.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="other", prompt="Hi", max_tokens=1)


def test_bad_requests_do_not_disturb_a_running_one(server: Server, model_name: str) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {
        "model": model_name,
        "prompt": "Count: one, two,",
        "max_tokens": 40,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    expected = client.completions.create(**kwargs).choices[0].text
    result: list[str] = []

    def good() -> None:
        chunks = client.completions.create(stream=True, **kwargs)
        result.append("".join(c.choices[0].text for c in chunks))

    worker = threading.Thread(target=good)
    worker.start()
    with server.http() as http:
        for route, body, status, _, _ in CASES:
            assert http.post(route, json=body).status_code == status
        assert http.post("/v1/completions", content=b"{oops").status_code == 400
    worker.join(120)
    assert result == [expected]


def test_unknown_fields_are_named_not_dropped(server: Server) -> None:
    with server.http() as http:
        for route, body in (
            ("/v1/completions", {**OK, "return_tokens_as_token_ids": True}),
            ("/v1/chat/completions", {**CHAT, "prompt_embeds": "AAAA"}),
            ("/tokenize", {"prompt": "Hi", "mystery": 1}),
        ):
            answer = http.post(route, json=body)
            assert answer.status_code == 400, route
            error = answer.json()["error"]
            field = next(k for k in body if k not in (*OK, *CHAT, "prompt"))
            assert error["param"] == field
            assert error["message"].startswith(f"field {field!r} is not accepted")
        ignored = {**OK, "metadata": {"team": "a"}, "store": False, "user": "u"}
        assert http.post("/v1/completions", json=ignored).status_code == 200


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server: Server) -> None:
    huge = "word " * 1_500_000  # 7.5 MB: far more text than 1024 tokens can hold
    with server.http() as http:
        for route, body in (
            ("/v1/completions", {**OK, "prompt": huge}),
            ("/v1/completions", {**OK, "prompt": ["Hi", huge]}),
            ("/tokenize", {"prompt": huge}),
        ):
            start = time.monotonic()
            error = http.post(route, json=body).json()["error"]
            assert time.monotonic() - start < 3, route  # tokenizing it took seconds
            assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
            assert error["message"].startswith("prompt has 7500000 characters, more than any")
        assert http.get("/health").status_code == 200
