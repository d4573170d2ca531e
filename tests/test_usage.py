"""Usage records: written locally, opt-outs honoured, sent only when asked, for real."""

from __future__ import annotations

import http.server
import json
import platform
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrun import envs
from kvrun.usage import USAGE_FILE, record_usage, stats_url, usage_enabled
from kvrun.version import __version__

KEYS = [
    "architecture",
    "extra",
    "kvrun_version",
    "machine",
    "os",
    "platform",
    "python_version",
    "timestamp",
    "usage_source",
]


class _Collector(http.server.BaseHTTPRequestHandler):
    received: queue.Queue[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put((self.path, self.headers["Content-Type"], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean


@pytest.fixture
def stats_server() -> Iterator[tuple[str, queue.Queue[tuple[str, str, bytes]]]]:
    received: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
    handler = type("Handler", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host!s}:{port}/usage", received
    server.shutdown()
    server.server_close()
    thread.join()


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_record_is_appended_under_the_config_root(tmp_path: Path) -> None:
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(tmp_path / "cfg"), "VLLM_USAGE_SOURCE": "test"})
    path = record_usage(env, platform="cpu", architecture="LlamaForCausalLM", extra={"tp": 1})
    assert path == tmp_path / "cfg" / USAGE_FILE
    second = record_usage(env, platform="cpu", architecture=None)
    assert second == path
    first_record, second_record = _records(path)
    assert sorted(first_record) == KEYS
    assert first_record["kvrun_version"] == __version__
    assert first_record["platform"] == "cpu"
    assert first_record["architecture"] == "LlamaForCausalLM"
    assert first_record["usage_source"] == "test"
    assert first_record["python_version"] == platform.python_version()
    assert first_record["os"] == platform.system()
    assert first_record["extra"] == {"tp": 1}
    assert isinstance(first_record["timestamp"], str)
    assert first_record["timestamp"].endswith("+00:00")
    assert (second_record["architecture"], second_record["extra"]) == (None, {})


@pytest.mark.parametrize(
    "opt_out",
    [
        {"VLLM_NO_USAGE_STATS": "1"},
        {"VLLM_DO_NOT_TRACK": "1"},
        {"DO_NOT_TRACK": "1"},
        {"DO_NOT_TRACK": "true"},
    ],
)
def test_opt_outs_write_nothing(tmp_path: Path, opt_out: dict[str, str]) -> None:
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(tmp_path), **opt_out})
    assert usage_enabled(env) is False
    assert record_usage(env, platform="cpu", architecture="GPT2LMHeadModel") is None
    assert list(tmp_path.iterdir()) == []


def test_do_not_track_file_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "do_not_track").touch()
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(tmp_path)})
    assert record_usage(env, platform="cpu", architecture=None) is None
    assert [p.name for p in tmp_path.iterdir()] == ["do_not_track"]


def test_unwritable_config_root_is_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")  # a file where the directory should be
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(blocker / "cfg")})
    assert record_usage(env, platform="cpu", architecture=None) is None


def test_sent_when_the_server_is_set_explicitly(
    tmp_path: Path, stats_server: tuple[str, queue.Queue[tuple[str, str, bytes]]]
) -> None:
    url, received = stats_server
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(tmp_path), "VLLM_USAGE_STATS_SERVER": url})
    assert stats_url(env) == url
    started = time.monotonic()
    path = record_usage(env, platform="cpu", architecture="Qwen2ForCausalLM")
    assert time.monotonic() - started < 1.0  # the POST happens in the background
    assert path is not None
    got_path, content_type, body = received.get(timeout=30)
    assert (got_path, content_type) == ("/usage", "application/json")
    assert json.loads(body) == _records(path)[0]


def test_nothing_sent_at_the_default_server(tmp_path: Path) -> None:
    env = envs.read_env({"VLLM_CONFIG_ROOT": str(tmp_path)})
    assert env.VLLM_USAGE_STATS_SERVER == "https://stats.vllm.ai"
    assert stats_url(env) is None
    before = {t.ident for t in threading.enumerate()}
    assert record_usage(env, platform="cpu", architecture=None) == tmp_path / USAGE_FILE
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    assert started == []


def test_nothing_sent_when_opted_out(
    tmp_path: Path, stats_server: tuple[str, queue.Queue[tuple[str, str, bytes]]]
) -> None:
    url, received = stats_server
    env = envs.read_env(
        {"VLLM_CONFIG_ROOT": str(tmp_path), "VLLM_USAGE_STATS_SERVER": url, "DO_NOT_TRACK": "1"}
    )
    assert record_usage(env, platform="cpu", architecture=None) is None
    with pytest.raises(queue.Empty):
        received.get(timeout=0.5)


def test_unreachable_server_never_raises(tmp_path: Path) -> None:
    # Port 9 on localhost refuses the connection; the record is still written.
    env = envs.read_env(
        {"VLLM_CONFIG_ROOT": str(tmp_path), "VLLM_USAGE_STATS_SERVER": "http://127.0.0.1:9/x"}
    )
    path = record_usage(env, platform="cpu", architecture=None)
    assert path == tmp_path / USAGE_FILE
    for thread in threading.enumerate():
        if thread.name == "kvrun-usage-stats":
            thread.join(timeout=30)
            assert not thread.is_alive()
