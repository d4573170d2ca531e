"""The on-disk cache of downloaded media (VLLM_ASSETS_CACHE), keyed by URL.

Invariants:

- Only complete downloads that passed every check of :mod:`kvrun.multimodal.fetch`
  (the address guard, the size cap, HTTP 200) are stored; a read returns None for an
  entry larger than the caller's cap.
- A file is ``<root>/kvrun-media/<sha256 of the URL>``, written to a temporary name and
  renamed, so a reader never sees half an entry.
- Bounded: entries older than ``max_age_s`` are not used (and removed), and after each
  store the least recently used entries (by modification time, refreshed on a hit) are
  removed until the whole cache is under ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time

__all__ = ["DEFAULT_MAX_AGE_S", "DEFAULT_MAX_BYTES", "AssetCache"]

DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_AGE_S = 3600.0


class AssetCache:
    def __init__(
        self,
        root: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        self.directory = os.path.join(root, "kvrun-media")
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()  # stores and evictions of this process, one at a time

    def _path(self, url: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(url.encode()).hexdigest())

    def get(self, url: str, cap: int) -> bytes | None:
        """The stored body of ``url``, or None (absent, too old, or over ``cap``)."""
        path = self._path(url)
        try:
            info = os.stat(path)
            if time.time() - info.st_mtime > self.max_age_s or info.st_size > cap:
                os.unlink(path)
                return None
            with open(path, "rb") as f:
                data = f.read(cap + 1)
            os.utime(path)  # recently used
        except OSError:
            return None
        return data if len(data) <= cap else None

    def put(self, url: str, body: bytes) -> None:
        """Store ``body`` (best effort: a full or read-only disk is not the request's
        problem), then evict down to ``max_bytes``."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(body)
                    os.replace(tmp, self._path(url))
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                self._evict()
            except OSError:
                return

    def _evict(self) -> None:
        entries = []
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    entries.append((info.st_mtime, info.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
            total -= size
