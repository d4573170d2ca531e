"""Run inside a network namespace of its own (tests/test_media_fetch.py starts it under
``unshare -n``): tries the URLs the fetcher must refuse and prints, as JSON, each
one's error and time, and how many requests the local media server saw.

Usage: ``python -m tests.support.media_guard_probe`` (from the repository root).
"""

from __future__ import annotations

import asyncio
import json
import time

from kvrun.multimodal.fetch import MediaFetchError, MediaPolicy, fetch_media
from tests.support.media_server import media_server

TIMEOUT_S = 3.0


async def _try(url: str, policy: MediaPolicy) -> dict[str, object]:
    start = time.monotonic()
    try:
        await fetch_media(url, "image", policy)
    except MediaFetchError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


async def main() -> None:
    timeouts = {"image": TIMEOUT_S, "video": TIMEOUT_S, "audio": TIMEOUT_S}
    open_policy = MediaPolicy(timeouts=timeouts)  # no allow-list: public hosts only
    listed = MediaPolicy(allowed_domains=frozenset({"127.0.0.1"}), timeouts=timeouts)
    with media_server() as server:
        port = server.port
        cases = {
            "metadata": ("http://169.254.169.254/latest/meta-data/", open_policy),
            "private": ("http://10.0.0.1/image.png", open_policy),
            "mapped": (f"http://[::ffff:127.0.0.1]:{port}/image.png", open_policy),
            "localhost": (f"http://localhost:{port}/image.png", open_policy),
            "loopback": (f"http://127.0.0.1:{port}/image.png", open_policy),
            "ipv6_loopback": (f"http://[::1]:{port}/image.png", open_policy),
            "decimal": (f"http://2130706433:{port}/image.png", open_policy),
            "passwd": ("file:///etc/passwd", open_policy),
            "ftp": ("ftp://example.com/image.png", open_policy),
            "redirect_metadata": (
                server.url("/redirect?to=http://169.254.169.254/latest/meta-data/"),
                listed,
            ),
            "redirect_private": (server.url("/redirect?to=http://10.0.0.1/x.png"), listed),
        }
        results = {name: await _try(url, policy) for name, (url, policy) in cases.items()}
        hits = dict(server.hits)
    print(json.dumps({"results": results, "hits": hits}))


if __name__ == "__main__":
    asyncio.run(main())
