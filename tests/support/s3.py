"""A real S3 endpoint for the tests: moto's standalone server, on 127.0.0.1 only.

:func:`moto_server` starts ``python -m moto.server`` as a child process with
authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``: the first few requests create an
IAM user and its access key, every later one must be signed with that key), waits a
bounded time for it to answer, and always stops it. :class:`S3Proxy` sits in front of
it: it counts the requests a load makes (the GETs of each object, with their ranges)
and can cut a chosen object's body short, as a dropped connection would.

Fixtures (registered in tests/conftest.py): ``moto`` (one server per session),
``s3_proxy`` (a fresh proxy in front of it per test), ``s3_bucket`` (a new bucket).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

__all__ = [
    "MotoServer",
    "S3Proxy",
    "moto",
    "moto_server",
    "s3_bucket",
    "s3_proxy",
    "upload_directory",
]

_READY_TIMEOUT_S = 30.0
# Unauthenticated requests moto allows before it checks signatures: the IAM set-up below.
_SETUP_ACTIONS = 4
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class MotoServer:
    """A running moto server and the one access key it accepts."""

    url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    def client(self, endpoint: str | None = None) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
        )


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, however it dies (Linux)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def moto_server(log_path: Path) -> Iterator[MotoServer]:
    """Generator for a fixture: start moto, create its IAM user and key, yield, stop."""
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}; see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not up after {_READY_TIMEOUT_S} s") from None
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=url,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
            region_name="us-east-1",
        )
        iam.create_user(UserName="kvrun-tests")
        policy = iam.create_policy(
            PolicyName="s3-all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        iam.attach_user_policy(UserName="kvrun-tests", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="kvrun-tests")["AccessKey"]
        yield MotoServer(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def upload_directory(client: Any, bucket: str, prefix: str, directory: Path) -> list[str]:
    """Put every plain file of ``directory`` at ``prefix/<name>``; the keys, sorted."""
    keys = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            key = f"{prefix}/{path.name}" if prefix else path.name
            client.upload_file(str(path), bucket, key)
            keys.append(key)
    return keys


@dataclass(frozen=True)
class Request:
    method: str
    key: str  # the object key (path without the bucket); "" for bucket-level requests
    range: str | None  # the Range header of a GET


class S3Proxy:
    """A pass-through HTTP proxy to ``upstream`` that records each request and cuts the
    body of any object whose key is in ``cut`` after half of it (then drops the
    connection). Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: list[Request] = []
        self.cut: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urlsplit(self.path).path
                key = unquote(path.lstrip("/").partition("/")[2])
                with proxy._lock:
                    proxy.requests.append(Request(self.command, key, self.headers.get("Range")))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                declared = response.getheader("Content-Length")
                self.send_header("Content-Length", declared or str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if self.command == "GET" and key in proxy.cut and data:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> S3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def object_gets(self, name: str | None = None) -> list[Request]:
        """The GETs of objects (not listings) so far; ``name``: only keys ending in /name."""
        with self._lock:
            gets = [r for r in self.requests if r.method == "GET" and r.key]
        return [r for r in gets if name is None or r.key.rpartition("/")[2] == name]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server for the session; the tests that use it skip without moto."""
    pytest.importorskip("boto3", reason='S3 tests need boto3 and moto: pip install -e ".[test]"')
    pytest.importorskip("moto", reason='S3 tests need boto3 and moto: pip install -e ".[test]"')
    yield from moto_server(tmp_path_factory.mktemp("moto") / "moto.log")


@pytest.fixture
def s3_proxy(moto: MotoServer) -> Iterator[S3Proxy]:
    running = S3Proxy(moto.url).start()
    yield running
    running.stop()


@pytest.fixture
def s3_bucket(moto: MotoServer) -> str:
    """A new, empty bucket (names are unique, so mirrors of earlier runs never match)."""
    name = f"kvrun-{uuid.uuid4().hex[:12]}"
    moto.client().create_bucket(Bucket=name)
    return name
