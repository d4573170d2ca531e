"""The auth matrix over every registered route of a live server, and path tricks on the wire."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from kvrun.server.app import build_app
from kvrun.server.auth import OPEN_PATHS
from kvrun.server.config import ServerConfig
from tests.server.conftest import API_KEY, Server


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route the session server registers (dev and profiler on)."""
    app = build_app(ServerConfig(api_key=API_KEY, dev_mode=True, profiler_dir="/tmp/x"))
    out = []
    for route in app.routes:
        assert isinstance(route, APIRoute | Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, route.path))
    return out


ROUTES = _routes()


def test_the_route_list_is_complete() -> None:
    paths = {p for _, p in ROUTES}
    assert {
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ping",
        "/version",
        "/metrics",
        "/reset_prefix_cache",
        "/start_profile",
        "/stop_profile",
    } <= paths


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_is_guarded_unless_open(server: Server, method: str, path: str) -> None:
    url = server.base_url + path
    if path in OPEN_PATHS:
        assert httpx.request(method, url).status_code == 200
        return
    no_key = httpx.request(method, url)
    wrong = httpx.request(method, url, headers={"Authorization": "Bearer wrong"})
    for answer in (no_key, wrong):
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "invalid_request_error"
    # the key opens it; routes that need a body answer 400 to an empty one
    if path in ("/start_profile", "/stop_profile"):
        return  # exercised in order by test_profile_routes
    opened = httpx.request(
        method, url, headers=server.headers, json={} if method == "POST" else None
    )
    assert opened.status_code in (200, 400), opened.text


def _raw_get(server: Server, path: str, key: str | None = None) -> int:
    """Send the path bytes as given (httpx would normalise them)."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        head = sock.recv(64).decode()
    return int(head.split(" ")[1])


@pytest.mark.parametrize(
    "path",
    [
        "//v1/models",
        "/v1/./models",
        "/v1//models",
        "/%2Fv1/models",
        "/v1%2Fmodels",
        "/v1/models/",
        "/health/../v1/models",
        "/health/%2E%2E/metrics",
        "/./metrics",
        "/metrics/",
    ],
)
def test_path_tricks_need_the_key(server: Server, path: str) -> None:
    assert _raw_get(server, path) == 401


@pytest.mark.parametrize(
    ("path", "status"), [("/health", 200), ("/health/", 307), ("//ping", 404), ("/version", 200)]
)
def test_open_paths_on_the_wire(server: Server, path: str, status: int) -> None:
    # open spellings pass authentication; routing then answers as it would anyway
    assert _raw_get(server, path) == status


def test_profile_routes(server: Server) -> None:
    with server.http() as http:
        assert http.post("/start_profile").status_code == 200
        assert (
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        )
        assert http.post("/stop_profile").status_code == 200
    traces = list((server.log_path.parent / "traces").glob("*.pt.trace.json.gz"))
    assert len(traces) == 1


def test_reset_prefix_cache(server: Server) -> None:
    with server.http() as http:
        answer = http.post("/reset_prefix_cache")
    assert answer.status_code == 200
    assert answer.json() == {"reset": True}
