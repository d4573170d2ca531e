"""`kvrun serve` option errors (no model is loaded) and `kvrun bench serve` on a live server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from kvrun.cli.bench_cmd import percentile
from tests.server.conftest import Server, kvrun_runs


def _kvrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


OPTION_ERRORS: list[tuple[list[str], str]] = [
    (["--port", "70000"], "kvrun: error: --port must be in [0, 65535], got 70000"),
    (["--max-n", "0"], "kvrun: error: --max-n must be > 0, got 0"),
    (["--shutdown-timeout", "-1"], "kvrun: error: --shutdown-timeout must be >= 0, got -1.0"),
    (
        ["--api-key", ""],
        "kvrun: error: --api-key is empty; give a key, or omit it to use VLLM_API_KEY",
    ),
    (["--root-path", "api"], "kvrun: error: --root-path must start with '/', got 'api'"),
    (
        ["a.gguf", "--model", "b.gguf"],
        "kvrun: error: the model is given twice, as MODEL='a.gguf' and --model='b.gguf'; give one",
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``missing``: a VLLM_RPC_BASE_PATH that does not exist; ``base``: an empty one."""
    return {
        "missing": tmp_path_factory.mktemp("rpc") / "missing",
        "base": tmp_path_factory.mktemp("rpc-base"),
    }


@pytest.fixture(scope="module")
def serve_errors(dirs: dict[str, Path]) -> Iterator[dict[str, Future[CompletedProcess[str]]]]:
    """Every failing `kvrun serve` of this module but the port-in-use one (which times
    itself), started two at a time in the background: case name -> its run."""
    missing, base = dirs["missing"], dirs["base"]
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        " ".join(args): (["serve", *args], {}) for args, _ in OPTION_ERRORS
    }
    cases["empty key"] = (["serve"], {"VLLM_API_KEY": ""})
    cases["missing rpc base"] = (["serve"], {"VLLM_RPC_BASE_PATH": str(missing)})
    cases["missing model"] = (
        ["serve", str(base / "nope.gguf")],
        {"VLLM_RPC_BASE_PATH": str(base)},
    )
    with kvrun_runs(cases) as runs:
        yield runs


@pytest.mark.parametrize(("args", "message"), OPTION_ERRORS)
def test_serve_option_errors(
    serve_errors: dict[str, Future[CompletedProcess[str]]], args: list[str], message: str
) -> None:
    done = serve_errors[" ".join(args)].result()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == message


def test_an_empty_vllm_api_key_is_refused_not_run_open(
    serve_errors: dict[str, Future[CompletedProcess[str]]],
) -> None:
    done = serve_errors["empty key"].result()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "kvrun: error: VLLM_API_KEY is set but empty, which would start the server without "
        "authentication; give a key, or unset VLLM_API_KEY to run without one"
    )


def test_serve_with_a_missing_rpc_base_path(
    serve_errors: dict[str, Future[CompletedProcess[str]]], dirs: dict[str, Path]
) -> None:
    done, missing = serve_errors["missing rpc base"].result(), dirs["missing"]
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"kvrun: error: VLLM_RPC_BASE_PATH={str(missing)!r} is not an existing directory; "
        "point it at a writable directory for the server's ipc:// sockets"
    )


def test_serve_with_a_missing_model(
    serve_errors: dict[str, Future[CompletedProcess[str]]], dirs: dict[str, Path]
) -> None:
    done, base = serve_errors["missing model"].result(), dirs["base"]
    assert done.returncode == 2
    assert "nope.gguf" in done.stderr.strip().splitlines()[-1]
    assert list(base.iterdir()) == []  # the socket directory was removed


def test_a_port_in_use_fails_before_the_model_loads() -> None:
    # after the serve_errors tests: their runs, in the background, are over (it times itself)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = _kvrun("serve", "--port", str(port))
        elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"kvrun: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    )
    assert "platform:" not in done.stderr  # the engine never started
    assert elapsed < 30  # the interpreter's start-up and imports, no model load


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def test_bench_serve(server: Server) -> None:
    done = _kvrun(
        "bench", "serve",
        "--base-url", server.base_url,
        "--api-key", server.api_key or "",
        "--concurrency", "2",
        "--num-prompts", "4",
        "--max-tokens", "8",
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["completed"] == 4
    assert result["failed"] == 0
    assert result["total_output_tokens"] == 32
    assert result["request_throughput"] > 0
    assert result["output_throughput"] == pytest.approx(32 / result["duration_s"])
    assert 0 < result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"]
    assert 0 < result["itl_ms"]["p50"] <= result["itl_ms"]["p99"]


def test_bench_reports_failures(server: Server) -> None:
    done = _kvrun(
        "bench", "serve", "--base-url", server.base_url, "--api-key", "wrong",
        "--model", "m", "--num-prompts", "2", "--max-tokens", "2",
    )  # fmt: skip
    assert done.returncode == 1
    assert "completed / failed:      0 / 2" in done.stdout
    assert "error: HTTP 401" in done.stdout


def test_bench_soak_reports_windows_with_aborts_and_rss(server: Server) -> None:
    done = _kvrun(
        "bench", "serve",
        "--base-url", server.base_url,
        "--api-key", server.api_key or "",
        "--request-rate", "4",
        "--duration", "6",
        "--window", "3",
        "--abort-fraction", "0.3",
        "--unique-prompts",
        # long enough (ignore_eos) that an abandoned request is still running when its
        # client gives up (at most 2 s): on a fast, quiet machine 24 tokens were not
        "--max-tokens", "128",
        "--ignore-eos",
        "--server-pid", str(server.proc.pid),
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    windows = json.loads(done.stdout)
    assert [w["start_s"] for w in windows] == [0.0, 3.0]
    assert all(w["failed"] == 0 for w in windows)
    assert sum(w["completed"] + w["aborted"] for w in windows) == 24  # 4/s for 6 s
    assert sum(w["aborted"] for w in windows) > 0
    assert all(0 < w["latency_ms"]["p50"] <= w["latency_ms"]["p99"] for w in windows)
    # The server and its engine process, each with its resident memory.
    rss = windows[-1]["rss_mib"]
    assert len(rss) >= 2 and all(v > 10 for v in rss.values())
    with server.http() as http:
        assert http.get("/metrics").status_code == 200  # and the server is still up
