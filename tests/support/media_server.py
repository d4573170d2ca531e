"""A media server on 127.0.0.1 for the media-fetching tests, run in a thread.

Routes: ``/image.png`` (:data:`png_bytes`), ``/slow`` (headers, then nothing until the
server stops), ``/big`` (an endless body; records how many bytes it got out before
the client hung up), ``/redirect?to=URL`` (302 to URL), ``/loop`` (302 to itself).
Every request is counted per path, so a test can tell that nothing was fetched.
"""

from __future__ import annotations

import io
import ssl
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MediaServer", "media_server", "mp4_bytes", "png_bytes"]

BIG_CHUNK = 64 << 10
BIG_LIMIT = 256 << 20  # /big gives up after this much (a bound on a broken client)


def png_bytes(size: tuple[int, int] = (48, 32), seed: int = 0) -> bytes:
    """A small RGB PNG with varied pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def mp4_bytes(frames: int = 4, size: int = 56) -> bytes:
    """A small MPEG-4 clip whose frames grow brighter."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), 40 + 50 * i, np.uint8)
            pixels[: size // 2, : size // 2] = 255 - 40 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, "rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (what the size and timeout tests do) is no error."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class MediaServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.hits: Counter[str] = Counter()
        self.server_names: list[str | None] = []  # the TLS clients' SNI, in order
        self.big_sent = 0  # bytes /big wrote before the client went away
        self.big_done = threading.Event()
        self.stopping = threading.Event()
        self.image = png_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # http.server calls it by this name
                url = urllib.parse.urlsplit(self.path)
                server.hits[url.path] += 1
                if url.path == "/image.png":
                    self._send(200, server.image, "image/png")
                elif url.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.flush()
                    server.stopping.wait(60)
                elif url.path == "/big":
                    self._big()
                elif url.path == "/redirect":
                    target = urllib.parse.parse_qs(url.query)["to"][0]
                    self._redirect(target)
                elif url.path == "/loop":
                    self._redirect("/loop")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, target: str) -> None:
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _big(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")  # no length: read until closed
                self.end_headers()
                chunk = b"\0" * BIG_CHUNK
                try:
                    while server.big_sent < BIG_LIMIT and not server.stopping.is_set():
                        self.wfile.write(chunk)
                        server.big_sent += len(chunk)
                except OSError:  # the client hung up: what the test expects
                    pass
                finally:
                    self.close_connection = True
                    server.big_done.set()

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:

            def record_sni(sock: Any, name: str | None, ctx: Any) -> None:
                self.server_names.append(name)

            tls.sni_callback = record_sni
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@contextmanager
def media_server(tls: ssl.SSLContext | None = None) -> Iterator[MediaServer]:
    server = MediaServer(tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
