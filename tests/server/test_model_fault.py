"""A real exception inside the model step: the engine dies, in-flight requests get 500,
and the server exits, or with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 stays up answering 503.

The fault comes from tests/fixtures/faulty, a real general-plugin distribution installed
into a private directory: through the ``kvrun_model_architectures`` hook it adds
``FaultyLlamaForCausalLM``, a Llama whose forward raises when a prompt starts with
token id 4242. The server loads it from a tiny random checkpoint whose config.json
names that architecture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server
from tests.server.test_faults import LONG, _alive, _sse_error, _start, _wait_running
from tests.support.fixture_plugins import install_fixture_plugins

FAULT_TOKEN_ID = 4242  # kvrun_fixture_faulty.FAULT_TOKEN_ID
FAULT = f"RuntimeError: fixture fault: a prompt starts with token id {FAULT_TOKEN_ID}"
DIED = f"the engine died: the engine failed: {FAULT}"
TRIGGER = {"prompt": [FAULT_TOKEN_ID, 100, 200], "max_tokens": 4}


@pytest.fixture(scope="module")
def faulty_site() -> Path:
    """The fixture distribution installed with pip into a private, reused directory."""
    return install_fixture_plugins(["faulty"])


@pytest.fixture(scope="module")
def faulty_checkpoint(
    random_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny random Llama checkpoint whose config.json names FaultyLlamaForCausalLM."""
    base = random_checkpoint("llama", seed=5)
    out = tmp_path_factory.mktemp("faulty-checkpoint")
    for path in base.iterdir():
        if path.name != "config.json":
            (out / path.name).symlink_to(path)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["FaultyLlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def start_faulty(
    spawn: Callable[..., Server], faulty_site: Path, faulty_checkpoint: Path
) -> Callable[..., Server]:
    def start(env: dict[str, str]) -> Server:
        path = os.pathsep.join(p for p in (str(faulty_site), os.environ.get("PYTHONPATH")) if p)
        return spawn(args=[str(faulty_checkpoint)], env={"PYTHONPATH": path, **env})

    return start


def test_model_exception_fails_requests_and_exits(start_faulty: Callable[..., Server]) -> None:
    server = start_faulty({})
    engine = server.engine_pid()
    with server.http() as http:
        # the plugin's architecture was loaded, and it generates normally until the fault
        assert http.get("/v1/models").json()["data"][0]["root"].endswith("faulty-checkpoint0")
        ok = http.post("/v1/completions", json={"prompt": [100, 200], "max_tokens": 2})
        assert ok.json()["usage"]["completion_tokens"] == 2
    plain, plain_out = _start(server, LONG, stream=False)
    streamed, stream_out = _start(server, LONG, stream=True)
    _wait_running(server, 2)
    with server.http() as http:
        answer = http.post("/v1/completions", json=TRIGGER)
    assert answer.status_code == 500
    assert answer.json() == {
        "error": {"message": DIED, "type": "server_error", "param": None, "code": 500}
    }
    plain.join(60)
    streamed.join(60)
    assert plain_out[0][0] == 500
    assert json.loads(plain_out[0][1])["error"]["message"] == DIED
    assert stream_out[0][0] == 200
    assert _sse_error(stream_out[0][1])["error"] == {
        "message": DIED,
        "type": "server_error",
        "param": None,
        "code": 500,
    }
    assert server.proc.wait(60) == 1
    assert not _alive(engine)
    assert server.rpc_dirs() == []
    log = server.log()
    assert "engine dead: the engine failed:" in log
    assert "in forward" in log  # the traceback of the model step is logged
    assert FAULT in log


def test_model_exception_with_keep_alive(start_faulty: Callable[..., Server]) -> None:
    # the engine in a thread of the server process: the same death, another transport
    server = start_faulty(
        {"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    )
    plain, plain_out = _start(server, LONG, stream=False)
    _wait_running(server, 1)
    with server.http() as http:
        assert http.post("/v1/completions", json=TRIGGER).json()["error"]["message"] == DIED
    plain.join(60)
    assert plain_out[0][0] == 500
    assert json.loads(plain_out[0][1])["error"]["message"] == DIED
    health = httpx.get(server.base_url + "/health")
    assert health.status_code == 503
    assert health.json()["error"] == {
        "message": f"the engine is dead: the engine failed: {FAULT}",
        "type": "server_error",
        "param": None,
        "code": 503,
    }
    assert server.proc.poll() is None
    with server.http() as http:
        again = http.post("/v1/completions", json={"prompt": [100], "max_tokens": 2})
        assert again.status_code == 503
        assert again.json()["error"]["message"] == f"the engine is dead: the engine failed: {FAULT}"
        assert http.get("/v1/models").status_code == 200
    assert server.proc.poll() is None
    assert server.stop() == 0
