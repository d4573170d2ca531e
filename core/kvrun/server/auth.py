"""API-key authentication: deny by default, with an explicit allowlist of open paths.

The middleware wraps the whole application, so a route added later is guarded
without anyone remembering to guard it. The allowlist is matched on a normalised
path (slashes collapsed, dot segments resolved, percent-decoding repeated, the
trailing slash and the ``--root-path`` prefix stripped), so spellings such as
``//v1/models``, ``/health/../v1/models`` or ``%2Fv1`` cannot reach a guarded
route without the key. The key is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import posixpath
import re
from collections.abc import Iterable
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from kvrun.server.errors import error_body

__all__ = ["OPEN_PATHS", "ApiKeyMiddleware", "normalize_path"]

# Paths answered without a key: liveness probes and the version, as vLLM does.
OPEN_PATHS: frozenset[str] = frozenset({"/health", "/ping", "/version"})

_SLASHES = re.compile(r"/{2,}")
# Enough rounds for any realistic double/triple encoding; an attacker that nests
# deeper gets a path that matches nothing open, which is denied anyway.
_MAX_DECODE_ROUNDS = 8


def _strip_root(path: str, root_path: str) -> str:
    """The path the router matches: ``root_path`` removed once, as Starlette does."""
    if not root_path or not path.startswith(root_path):
        return path
    if path == root_path:
        return "/"
    if path[len(root_path)] == "/":
        return path[len(root_path) :]
    return path


def normalize_path(path: str, root_path: str = "") -> str:
    """The canonical form of a request path, for matching the allowlist only."""
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    path = _strip_root(path, root_path.rstrip("/"))
    # normpath keeps a leading "//" (POSIX allows it to mean something), so collapse first.
    path = posixpath.normpath("/" + _SLASHES.sub("/", path))
    path = _SLASHES.sub("/", path)
    return path.rstrip("/") or "/"


def _unauthorized(message: str) -> bytes:
    return json.dumps(error_body(message, 401, code="invalid_api_key")).encode()


class ApiKeyMiddleware:
    """ASGI middleware: every HTTP or websocket request needs ``Authorization: Bearer KEY``
    unless its normalised path is in ``open_paths``."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._key = api_key.encode()
        self._open = frozenset(open_paths)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest on the whole token; the scheme check leaks nothing secret.
                ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
                return ok
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = normalize_path(scope.get("path", "/"), scope.get("root_path", ""))
        if path in self._open or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = _unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
