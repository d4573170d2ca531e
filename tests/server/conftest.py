"""Real `kvrun serve` processes on 127.0.0.1 for the server tests.

Session-scoped servers serve most tests: ``server`` (the default model, SmolLM2-135M
GGUF; API key, dev mode and profiler routes on), ``tools_server`` (the same model with
tool and reasoning parsers and trusted request templates) and ``pooler`` (a tiny random
Qwen2 with ``--runner pooling`` and a LoRA adapter). Fault, SIGTERM and configuration
cases start their own short-lived ones with :func:`launch`. Every server runs on the cpu
platform with a small context and KV space, so the whole suite stays cheap on two cores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

MAX_MODEL_LEN = 1024
API_KEY = "sk-test-4d1f"
START_TIMEOUT_S = 300.0
K = TypeVar("K", bound=Hashable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_kvrun(
    argv: Sequence[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


@contextlib.contextmanager
def kvrun_runs(
    cases: Mapping[K, tuple[Sequence[str], Mapping[str, str]]], timeout: float = 300.0
) -> Iterator[dict[K, concurrent.futures.Future[subprocess.CompletedProcess[str]]]]:
    """``python -m kvrun.cli.main ARGV`` once per case (``os.environ`` plus the case's
    variables), two at a time in the background: case -> the future of its run.

    Each run is independent and spends its seconds in interpreter start-up and imports,
    which one core does alone: on two cores a pair takes the time of one. A test waits
    for its own run only (``.result()``), so each keeps its own time budget. Leaving the
    block waits for the runs still going and drops those not started."""
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        yield {
            key: pool.submit(_run_kvrun, argv, env, timeout) for key, (argv, env) in cases.items()
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    api_key: str | None
    rpc_base: Path
    log_path: Path
    _client: openai.OpenAI | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int:
        match = re.search(r"engine process (\d+) started", self.log())
        assert match is not None, self.log()
        return int(match.group(1))

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def client(self) -> openai.OpenAI:
        """One shared client per server, closed by :meth:`stop`."""
        if self._client is None:
            self._client = openai.OpenAI(
                base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0
            )
        return self._client

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0
        )

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics, labels dropped for metrics labelled only with the model
        name and engine 0 (every metric of a server with one engine)."""
        with self.http() as http:
            text = http.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[re.sub(r'\{engine="0",model_name="[^"]*"\}', "", name)] = float(value)
        return out

    def wait_metric(self, name: str, value: float, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.metrics().get(name)
            if seen == value:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} stayed {seen}, expected {value}")

    def rpc_dirs(self) -> list[Path]:
        return sorted(self.rpc_base.glob("kvrun-rpc-*"))

    def cleanup(self) -> None:
        """Kill the server and whatever it started (its engine processes share its
        process group, and outlive a frontend that died or was killed alone), then
        remove its socket base directory."""
        if self._client is not None:
            self._client.close()
        with contextlib.suppress(ProcessLookupError):  # an empty group: all ended already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        shutil.rmtree(self.rpc_base, ignore_errors=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self._client is not None:
            self._client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def launch(
    workdir: Path,
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    api_key: str | None = API_KEY,
    prefix: Sequence[str] = (),
) -> Server:
    """Start `kvrun serve` and wait until /health answers 200; ``prefix``: a command
    that runs the server (it must exec it, so the server keeps the process id)."""
    workdir.mkdir(parents=True, exist_ok=True)
    # ipc:// paths must stay under ~100 bytes: pytest's tmp paths can be longer
    rpc_base = Path(tempfile.mkdtemp(prefix="kvrun-test-"))
    log_path = workdir / "server.log"
    port = free_port()
    environ = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        # the engine writes its whole KV pool at start (~1 s a GiB): 0.25 GiB holds
        # 5,800 tokens of the default model in float32 (11,600 in bfloat16), above the
        # ~4,000 any test here keeps in flight
        "VLLM_CPU_KVCACHE_SPACE": "0.25",
        "VLLM_RPC_BASE_PATH": str(rpc_base),
        **(env or {}),
    }
    environ.pop("VLLM_API_KEY", None)
    cmd = [
        *prefix,
        sys.executable, "-m", "kvrun.cli.main", "serve",
        "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--uvicorn-log-level", "warning",
        *(["--api-key", api_key] if api_key else []),
        # e.g. "--attention-backend REFERENCE" to run the suite on another backend
        *os.environ.get("KVRUN_TEST_SERVE_ARGS", "").split(),
        *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # its own session, so a test can signal the server's whole process group
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True
        )
    server = Server(proc, port, api_key, rpc_base, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.cleanup()
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.cleanup()
    raise AssertionError(f"server did not start in {START_TIMEOUT_S}s:\n{server.log()}")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """:func:`launch` for one test; whatever it started is killed afterwards if still up."""
    started: list[Server] = []

    def start(**kw: Any) -> Server:
        srv = launch(tmp_path / f"server{len(started)}", **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.cleanup()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("server")
    srv = launch(
        workdir,
        env={
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_TORCH_PROFILER_DIR": str(workdir / "traces"),
        },
    )
    yield srv
    status = srv.stop()
    srv.cleanup()
    assert status == 0, srv.log()


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tool calling and reasoning parsers on, and request chat templates trusted: the tool
    tests (test_tools.py) and the sandboxed-template test (test_bad_input.py) share it."""
    srv = launch(
        tmp_path_factory.mktemp("tools-server"),
        args=[
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--reasoning-parser",
            "qwen3",
            "--trust-request-chat-template",
        ],
    )
    yield srv
    status = srv.stop()
    srv.cleanup()
    assert status == 0, srv.log()


@pytest.fixture(scope="session")
def pooling_base(random_checkpoint: Callable[..., Path]) -> Path:
    """A random tiny Qwen2 (tests/server/test_lora.py's base too)."""
    return random_checkpoint("qwen2", seed=5, num_layers=2)


@pytest.fixture(scope="session")
def pooling_adapter(pooling_base: Path) -> Path:
    from tests.support.lora import make_adapter

    return make_adapter(pooling_base, seed=1, r=8, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="session")
def pooler(
    pooling_base: Path, pooling_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`kvrun serve --runner pooling` on :func:`pooling_base` in float32 (compared with
    transformers' float32), served as ``base``, with the LoRA adapter ``adapted``: the
    pooling tests (test_pooling.py) and the pooling LoRA test (test_lora_pooling.py)."""
    args = [
        "--model", str(pooling_base),
        "--served-model-name", "base",
        "--runner", "pooling",
        "--dtype", "float32",
        "--enable-lora",
        "--lora-modules", f"adapted={pooling_adapter}",
    ]  # fmt: skip
    srv = launch(
        tmp_path_factory.mktemp("pooling"), args=args, env={"VLLM_CPU_KVCACHE_SPACE": "0.1"}
    )
    yield srv
    status = srv.stop()
    srv.cleanup()
    assert status == 0, srv.log()


@pytest.fixture(scope="session")
def model_name(server: Server) -> str:
    with server.http() as http:
        name: str = http.get("/v1/models").json()["data"][0]["id"]
    return name
