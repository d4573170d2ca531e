"""The API-key middleware: path normalisation and deny-by-default, at the ASGI level."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import textwrap
from typing import Any

import pytest

from kvrun.server.auth import OPEN_PATHS, ApiKeyMiddleware, normalize_path


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/health", "", "/health"),
        ("/health/", "", "/health"),
        ("//health", "", "/health"),
        ("/./health", "", "/health"),
        ("/v1/../health", "", "/health"),
        ("/v1/models", "", "/v1/models"),
        ("//v1/models", "", "/v1/models"),
        ("/v1/./models", "", "/v1/models"),
        ("/health/../v1/models", "", "/v1/models"),
        ("/%2Fv1/models", "", "/v1/models"),
        ("/v1%2Fmodels", "", "/v1/models"),
        ("/v1%252Fmodels", "", "/v1/models"),  # double encoding
        ("/%2e%2e/v1/models", "", "/v1/models"),
        ("/health\\..\\v1", "", "/v1"),
        ("/../../health", "", "/health"),
        ("", "", "/"),
        ("/api/health", "/api", "/health"),
        ("/api/health", "/api/", "/health"),
        ("/api//v1/models", "/api", "/v1/models"),
        ("/apihealth", "/api", "/apihealth"),
        ("/api", "/api", "/"),
        ("/HEALTH", "", "/HEALTH"),
    ],
)
def test_normalize_path(path: str, root: str, expected: str) -> None:
    assert normalize_path(path, root) == expected


class _Recorder:
    """The inner application: records that it was reached."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(
    path: str, headers: list[tuple[bytes, bytes]], root: str = "", kind: str = "http"
) -> tuple[list[dict[str, Any]], list[str]]:
    inner = _Recorder()
    app = ApiKeyMiddleware(inner, api_key="s3cret")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path, "root_path": root, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, inner.reached


GOOD = [(b"authorization", b"Bearer s3cret")]


@pytest.mark.parametrize("path", [*sorted(OPEN_PATHS), "/health/", "//ping", "/./version"])
def test_open_paths_need_no_key(path: str) -> None:
    sent, reached = _call(path, [])
    assert reached == [path]
    assert sent[0]["status"] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models",
        "//v1/models",
        "/v1/./models",
        "/v1/models/",
        "/%2Fv1/models",
        "/health/../v1/models",
        "/health%2F..%2Fv1%2Fmodels",
        "/metrics",
        "/route/added/later",
        "/",
        "/HEALTH",
        "/health;.js",
        "/health%00",
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"authorization", b"Bearer wrong")],
        [(b"authorization", b"Bearer s3cre")],
        [(b"authorization", b"Bearer s3cretX")],
        [(b"authorization", b"Basic s3cret")],
        [(b"authorization", b"s3cret")],
        [(b"x-api-key", b"s3cret")],
    ],
)
def test_guarded_paths_refuse_without_the_key(
    path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    sent, reached = _call(path, headers)
    assert reached == []
    assert sent[0]["status"] == 401
    assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body == {
        "error": {
            "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


@pytest.mark.parametrize(
    "header", [b"Bearer s3cret", b"bearer s3cret", b"BEARER s3cret", b"Bearer  s3cret "]
)
def test_the_key_opens_guarded_paths(header: bytes) -> None:
    sent, reached = _call("/v1/models", [(b"authorization", header)])
    assert reached == ["/v1/models"]
    assert sent[0]["status"] == 200


def test_root_path_is_stripped_before_the_allowlist() -> None:
    # uvicorn puts the root path in front of the request path
    assert _call("/api/health", [], root="/api")[1] == ["/api/health"]
    assert _call("/api/api/health", [], root="/api")[1] == []
    assert _call("/api/v1/models", [], root="/api")[1] == []
    assert _call("/api/v1/models", GOOD, root="/api")[1] == ["/api/v1/models"]


def test_websocket_without_key_is_closed() -> None:
    sent, reached = _call("/v1/models", [], kind="websocket")
    assert reached == []
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_lifespan_passes_through() -> None:
    _sent, reached = _call("/", [], kind="lifespan")
    assert reached == ["/"]


def test_the_key_is_compared_in_constant_time() -> None:
    # A timing test would be flaky on a shared VM; the property is structural: the
    # middleware's check reaches the key only through hmac.compare_digest, never ==.
    source = textwrap.dedent(inspect.getsource(ApiKeyMiddleware._authorized))
    tree = ast.parse(source)
    calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert "hmac.compare_digest" in calls
    uses_key = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and "_key" in ast.unparse(node)
    ]
    assert uses_key == [], [ast.unparse(n) for n in uses_key]
