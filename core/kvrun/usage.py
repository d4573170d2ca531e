"""Usage statistics, kept local unless the user asks for them to be sent.

One JSON line per engine start is appended to ``$VLLM_CONFIG_ROOT/usage_stats.jsonl``:
the kvrun version, platform, model architecture, VLLM_USAGE_SOURCE, time, Python
version, OS and CPU kind, plus scalars the caller adds. Never prompts, outputs, paths
or model names.

- Nothing is recorded when VLLM_NO_USAGE_STATS, VLLM_DO_NOT_TRACK or DO_NOT_TRACK is
  set, or when the file ``$VLLM_CONFIG_ROOT/do_not_track`` exists (as in vLLM).
- A record is sent only when the user set VLLM_USAGE_STATS_SERVER themselves (vLLM
  sends to its default server unless told not to). Sending happens in a daemon
  thread with a short timeout and never raises or delays the caller.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform as _platform
import threading
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from kvrun.envs import EnvSnapshot
from kvrun.version import __version__

__all__ = ["USAGE_FILE", "UsageValue", "record_usage", "stats_url", "usage_enabled"]

USAGE_FILE = "usage_stats.jsonl"
UsageValue = str | int | float | bool
# Seconds one POST may take; the thread is a daemon, so this only bounds its life.
_SEND_TIMEOUT_S = 5.0
_logger = logging.getLogger("kvrun.usage")


def usage_enabled(env: EnvSnapshot) -> bool:
    """False when any opt-out is set: the three variables or the do_not_track file."""
    if env.VLLM_NO_USAGE_STATS or env.VLLM_DO_NOT_TRACK or env.DO_NOT_TRACK:
        return False
    return not (Path(env.VLLM_CONFIG_ROOT) / "do_not_track").exists()


def stats_url(env: EnvSnapshot) -> str | None:
    """Where records are sent: only a server the user named explicitly, else None."""
    if env.source("VLLM_USAGE_STATS_SERVER") != "environment":
        return None
    return env.VLLM_USAGE_STATS_SERVER


def record_usage(
    env: EnvSnapshot,
    *,
    platform: str,
    architecture: str | None,
    extra: Mapping[str, UsageValue] | None = None,
) -> Path | None:
    """Append one usage record; returns the file written, or None when opted out or
    the file cannot be written (a usage record is never worth failing a run for)."""
    if not usage_enabled(env):
        return None
    record: dict[str, object] = {
        "kvrun_version": __version__,
        "platform": platform,
        "architecture": architecture,
        "usage_source": env.VLLM_USAGE_SOURCE,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python_version": _platform.python_version(),
        "os": _platform.system(),
        "machine": _platform.machine(),
        "extra": dict(extra or {}),  # caller-chosen scalars, e.g. dtype or tensor_parallel_size
    }
    line = json.dumps(record, sort_keys=True)
    path = Path(env.VLLM_CONFIG_ROOT) / USAGE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:
        _logger.debug("could not write usage record to %s: %s", path, exc)
        return None
    url = stats_url(env)
    if url is not None:
        threading.Thread(
            target=_send, args=(url, line.encode()), name="kvrun-usage-stats", daemon=True
        ).start()
    return path


def _send(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=_SEND_TIMEOUT_S) as response:
            response.read()
    except Exception as exc:  # a stats server being down is never the user's problem
        _logger.debug("usage record not sent to %s: %s", url, exc)
