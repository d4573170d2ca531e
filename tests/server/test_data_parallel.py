"""Data parallelism: `kvrun serve -dp 2` (two engine cores behind one frontend), ranks
launched separately with VLLM_DP_*, the balancer's rule, the refusals, and a killed core.

One DP=2 server serves the module's tests in order; the last of them kills one of its
cores (the fault test), so it must stay last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvrun import envs
from kvrun.errors import ConfigError, KvrunError
from kvrun.scheduling import SchedulerStats
from kvrun.server.data_parallel import (
    LOCALITY_SLACK,
    Balancer,
    DataParallelConfig,
    merge_stats,
    resolve_data_parallel,
)
from kvrun.stats import EngineStats
from tests.server.conftest import MAX_MODEL_LEN, Server, free_port, kvrun_runs, launch

GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
PROMPTS = [f"{i} + {i} =" for i in range(4)] + [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
]


def _alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped (reaped processes leave /proc)."""
    return Path(f"/proc/{pid}").exists()


def _engine_pids(server: Server) -> dict[int, int]:
    """rank -> engine process id, from the server's log."""
    found = re.findall(r"DP rank (\d+): engine process (\d+) started", server.log())
    return {int(rank): int(pid) for rank, pid in found}


def _per_engine(server: Server, name: str) -> dict[int, float]:
    """One metric's value by engine label."""
    with server.http() as http:
        text = http.get("/metrics").text
    out: dict[int, float] = {}
    for line in text.splitlines():
        match = re.match(rf'{re.escape(name)}\{{engine="(\d+)",[^}}]*\}} (\S+)$', line)
        if match:
            out[int(match.group(1))] = float(match.group(2))
    return out


def _wait_per_engine(server: Server, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[int, float] = {}
    while time.monotonic() < deadline:
        seen = _per_engine(server, name)
        if seen and all(v == value for v in seen.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} is {seen}, expected {value} on every engine")


def private_shm(directory: Path) -> list[str]:
    """A launch prefix: the server (and every process it starts) sees ``directory`` as
    its /dev/shm (a mount namespace of its own; we are root), so what it leaves there is
    exactly what it leaked, whatever else runs on the machine."""
    directory.mkdir(parents=True, exist_ok=True)
    script = 'mount --bind "$0" /dev/shm && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(directory)]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("dp2")
    # kept alive on engine death, so the fault test (last) can read /health's 503
    srv = launch(
        workdir,
        args=["--data-parallel-size", "2"],
        # two engine processes start at once: on a loaded machine their hello is slow
        env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1", "VLLM_RPC_TIMEOUT": "60000"},
        api_key=None,
        prefix=private_shm(workdir / "shm"),
    )
    try:
        yield srv
    finally:
        srv.cleanup()


def _complete_all(server: Server, prompts: list[str], max_tokens: int = 8) -> list[str]:
    async def run() -> list[str]:
        client = server.async_client()
        outs = await asyncio.gather(
            *(
                client.completions.create(
                    model=None,  # type: ignore[arg-type]
                    prompt=p,
                    max_tokens=max_tokens,
                    **GREEDY,
                )
                for p in prompts
            )
        )
        await client.close()
        return [o.choices[0].text for o in outs]

    return asyncio.run(run())


# --- the balancer's rule, alone ---------------------------------------------------------


def test_balancer_picks_the_least_loaded_rank_then_the_longest_idle() -> None:
    balancer = Balancer(2)
    assert [balancer.choose([1, 2]) for _ in range(4)] == [0, 1, 0, 1]
    balancer.finished(1)
    assert balancer.choose([3]) == 1  # fewest unfinished
    balancer.waiting = [5, 0]  # equal load: the shorter waiting queue wins
    balancer.finished(0)
    balancer.finished(1)
    assert balancer.choose([4]) == 1


def test_balancer_keeps_a_prompt_prefix_on_its_rank_until_that_rank_is_much_busier() -> None:
    balancer = Balancer(2)
    balancer.block_size = 4
    shared = [7, 7, 7, 7, 1]  # first block [7, 7, 7, 7]
    home = balancer.choose(shared)
    other = 1 - home
    # the same first block returns home while it has at most LOCALITY_SLACK more requests
    for _ in range(LOCALITY_SLACK):
        assert balancer.choose([7, 7, 7, 7, 2]) == home
    assert balancer.unfinished[home] - balancer.unfinished[other] == LOCALITY_SLACK + 1
    assert balancer.choose([7, 7, 7, 7, 3]) == other  # much busier: balance wins
    assert balancer.choose([7, 7, 7, 7, 4]) == other  # ... and the prefix moved there
    # a LoRA adapter is part of the key; prompts shorter than a block have none
    assert balancer.locality_key([7, 7, 7, 7], "a") != balancer.locality_key([7, 7, 7, 7], None)
    assert balancer.locality_key([7, 7, 7], None) is None


def test_merged_stats_sum_the_ranks() -> None:
    a = EngineStats(SchedulerStats(3, 2, 0.5, 4, 8, 100, 40, 1), 500, 70)
    b = EngineStats(SchedulerStats(1, 0, 0.0, 24, 24, 30, 0, 2), 50, 9)
    merged = merge_stats([a, b])
    assert merged.scheduler == SchedulerStats(4, 2, 4 / 32, 28, 32, 130, 40, 3)
    assert (merged.prompt_tokens_total, merged.generation_tokens_total) == (550, 79)


# --- configuration ---------------------------------------------------------------------


class _Args:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def test_data_parallel_settings_from_flags_and_variables() -> None:
    env = envs.read_env({})
    assert resolve_data_parallel(_Args(), env) == DataParallelConfig()
    two = resolve_data_parallel(_Args(data_parallel_size_arg=2), env)
    assert (two.size, two.local_size, two.headless, two.master) == (2, 2, False, "127.0.0.1:29550")
    env = envs.read_env(
        {
            "VLLM_DP_RANK": "1",
            "VLLM_DP_SIZE": "3",
            "VLLM_DP_MASTER_IP": "127.0.0.2",
            "VLLM_DP_MASTER_PORT": "4567",
        }
    )
    rank1 = resolve_data_parallel(_Args(), env)
    assert (rank1.size, rank1.start_rank, rank1.local_size, rank1.headless) == (3, 1, 1, True)
    assert rank1.master == "127.0.0.2:4567"
    rank0 = resolve_data_parallel(
        _Args(), envs.read_env({"VLLM_DP_RANK": "0", "VLLM_DP_SIZE": "2"})
    )
    assert (rank0.local_size, rank0.headless, list(rank0.remote_ranks)) == (1, False, [1])


@pytest.mark.parametrize(
    ("args", "environ", "named"),
    [
        ({"data_parallel_size_arg": 2}, {"VLLM_DP_SIZE": "3"}, ["--data-parallel-size 2", "VLLM_DP_SIZE=3"]),
        ({}, {"VLLM_DP_SIZE": "2", "VLLM_DP_RANK": "2"}, ["VLLM_DP_RANK=2", "0..1"]),
        ({"data_parallel_size_arg": 2}, {"VLLM_DP_MASTER_IP": "master.local"}, ["VLLM_DP_MASTER_IP", "'master.local'"]),
        ({"data_parallel_size_arg": 2, "data_parallel_rpc_port": 70000}, {}, ["--data-parallel-rpc-port=70000"]),
        ({"data_parallel_size_arg": 2, "headless": True}, {}, ["--headless", "--data-parallel-start-rank"]),
        ({"data_parallel_size_arg": 2, "data_parallel_size_local": 3}, {}, ["--data-parallel-size-local"]),
        ({"data_parallel_size_arg": 0}, {}, ["--data-parallel-size must be >= 1"]),
        ({"data_parallel_size_arg": 2}, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, ["VLLM_ENABLE_V1_MULTIPROCESSING=0"]),
    ],
)  # fmt: skip
def test_bad_data_parallel_settings_are_refused(
    args: dict[str, Any], environ: dict[str, str], named: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_data_parallel(_Args(**args), envs.read_env(environ))
    for text in named:
        assert text in str(info.value)


def test_a_bad_variable_value_stops_serve_with_its_name(tmp_path: Path) -> None:
    cases = {
        "VLLM_DP_SIZE='two'": {"VLLM_DP_SIZE": "two"},
        "VLLM_DP_SIZE=3": {"VLLM_DP_SIZE": "3"},  # against --data-parallel-size 2
    }
    argv = ["serve", "-dp", "2", "--port", "1"]
    runs = {named: (argv, {"VLLM_TARGET_DEVICE": "cpu", **env}) for named, env in cases.items()}
    with kvrun_runs(runs, timeout=120) as started:
        for named, future in started.items():
            proc = future.result()
            assert proc.returncode != 0
            assert named in proc.stderr, proc.stderr


def test_offline_llm_refuses_data_parallelism() -> None:
    from kvrun import LLM

    with pytest.raises(KvrunError, match=r"kvrun serve --data-parallel-size 2"):
        LLM(data_parallel_size=2)


def test_a_rank_whose_master_nobody_listens_on_fails_in_time(tmp_path: Path) -> None:
    port = free_port()  # closed again: nobody listens there
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", "serve", "--max-model-len", "64"],
        env={
            **os.environ,
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_DP_RANK": "1",
            "VLLM_DP_SIZE": "2",
            "VLLM_DP_MASTER_IP": "127.0.0.1",
            "VLLM_DP_MASTER_PORT": str(port),
            "VLLM_RPC_TIMEOUT": "2000",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"DP rank 1 could not reach the data-parallel master at 127.0.0.1:{port}" in proc.stderr
    assert "within 2 s" in proc.stderr
    assert time.monotonic() - started < 100  # start-up plus the 2 s bound, never a hang


# --- one DP=2 server -------------------------------------------------------------------


def test_concurrent_clients_get_what_one_engine_answers(dp_server: Server, server: Server) -> None:
    before = _per_engine(dp_server, "vllm:prompt_tokens_total")
    texts = _complete_all(dp_server, PROMPTS * 2)
    assert all(texts)
    # greedy outputs equal a single engine's (the session's DP=1 server)
    reference = _complete_all(server, PROMPTS)
    assert texts == reference * 2
    # both ranks got work
    after = _per_engine(dp_server, "vllm:prompt_tokens_total")
    assert set(after) == {0, 1}
    assert all(after[r] > before.get(r, 0.0) for r in (0, 1)), (before, after)
    # the summed gauges settle to zero on every engine
    _wait_per_engine(dp_server, "vllm:num_requests_running", 0.0)


def test_a_repeated_prompt_goes_to_the_rank_that_cached_it(dp_server: Server) -> None:
    # a first block no earlier request had: only the rank that ran it can hit its cache
    prompt = f"[{uuid.uuid4().hex}] Describe the sea in one short sentence, please."
    before = _per_engine(dp_server, "vllm:prefix_cache_hits_total")
    tokens_before = _per_engine(dp_server, "vllm:prompt_tokens_total")
    first = _complete_all(dp_server, [prompt], max_tokens=4)
    # alone again: by load alone it would go to the other rank (the one chosen longer ago)
    second = _complete_all(dp_server, [prompt], max_tokens=4)
    assert first == second
    hits = _per_engine(dp_server, "vllm:prefix_cache_hits_total")
    tokens = _per_engine(dp_server, "vllm:prompt_tokens_total")
    ran = [r for r in tokens if tokens[r] > tokens_before.get(r, 0.0)]
    assert len(ran) == 1, (tokens_before, tokens)
    assert hits[ran[0]] >= before.get(ran[0], 0.0) + 16  # at least one block of 16


def test_streaming_through_two_engines(dp_server: Server) -> None:
    client = dp_server.client()
    whole = client.completions.create(model=None, prompt=PROMPTS[4], max_tokens=8, **GREEDY)  # type: ignore[arg-type]
    chunks = client.completions.create(
        model=None,  # type: ignore[arg-type]
        prompt=PROMPTS[4],
        max_tokens=8,
        stream=True,
        **GREEDY,
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_an_abort_reaches_the_core_that_runs_the_request(dp_server: Server) -> None:
    max_tokens = 900
    before = _per_engine(dp_server, "vllm:generation_tokens_total")
    with (
        httpx.Client(base_url=dp_server.base_url, timeout=120) as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "Write a very long story.",
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
            },
        ) as answer,
    ):
        lines = answer.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: {")
            if got >= 3:
                break  # the client goes away mid-generation
    _wait_per_engine(dp_server, "vllm:num_requests_running", 0.0, timeout=90)
    after = _per_engine(dp_server, "vllm:generation_tokens_total")
    generated = sum(after.values()) - sum(before.values())
    # the core that ran it stopped early: an abort sent elsewhere would let it run on
    assert 3 <= generated < max_tokens, generated


def test_killed_core_fails_requests_and_every_core_is_reaped(dp_server: Server) -> None:
    """Kept last: it kills one of the module server's cores."""
    pids = _engine_pids(dp_server)
    assert set(pids) == {0, 1}
    results: list[Any] = []

    def in_flight() -> None:
        with httpx.Client(base_url=dp_server.base_url, timeout=120) as http:
            answer = http.post(
                "/v1/completions",
                json={"prompt": "Count to one thousand.", "max_tokens": 900, "ignore_eos": True},
            )
            results.append((answer.status_code, answer.json()))

    threads = [threading.Thread(target=in_flight) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(_per_engine(dp_server, "vllm:num_requests_running").values()) < 2:
        assert time.monotonic() < deadline, "the requests never ran"
        time.sleep(0.1)
    os.kill(pids[1], signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    assert [status for status, _ in results] == [500, 500]
    assert all("DP rank 1" in body["error"]["message"] for _, body in results)
    health = httpx.get(dp_server.base_url + "/health")
    assert health.status_code == 503
    assert "DP rank 1" in health.json()["error"]["message"]
    # the other core is stopped and reaped while the server stays up answering 503
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, f"engine processes left: {pids}"
        time.sleep(0.1)
    assert dp_server.proc.poll() is None
    # SIGTERM stops the frontend: no process, socket file or shared memory left behind
    assert dp_server.stop() == 0
    assert dp_server.rpc_dirs() == []
    assert os.listdir(dp_server.log_path.parent / "shm") == []


def test_a_hung_core_is_found_while_the_other_keeps_talking(spawn: Any) -> None:
    """Rank 0 heartbeats on; rank 1 stops (SIGSTOP): its own silence kills the server."""
    server = spawn(
        args=["-dp", "2"],
        env={"VLLM_ENGINE_ITERATION_TIMEOUT_S": "5", "VLLM_RPC_TIMEOUT": "60000"},
        api_key=None,
    )
    pids = _engine_pids(server)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        assert server.proc.wait(60) == 1
    finally:
        if _alive(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    assert "DP rank 1 has not answered for" in server.log()
    assert "VLLM_ENGINE_ITERATION_TIMEOUT_S=5" in server.log()
    assert not any(_alive(pid) for pid in pids.values())
    assert server.rpc_dirs() == []


# --- ranks launched separately ---------------------------------------------------------


def test_externally_launched_ranks_share_the_work(tmp_path: Path) -> None:
    port = free_port()
    common = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "0.25",  # as launch() gives rank 0
        "VLLM_DP_SIZE": "2",
        "VLLM_DP_MASTER_IP": "127.0.0.1",
        "VLLM_DP_MASTER_PORT": str(port),
        "VLLM_RPC_TIMEOUT": "300000",  # rank 1 may be up well before rank 0 listens
    }
    log = (tmp_path / "rank1.log").open("wb")
    rank1 = subprocess.Popen(
        [sys.executable, "-m", "kvrun.cli.main", "serve", "--max-model-len", str(MAX_MODEL_LEN)],
        env={**os.environ, **common, "VLLM_DP_RANK": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rank0: Server | None = None
    try:
        rank0 = launch(tmp_path / "rank0", env={**common, "VLLM_DP_RANK": "0"}, api_key=None)
        assert "DP rank 1 registered" in rank0.log()
        texts = _complete_all(rank0, PROMPTS)
        assert all(texts)
        served = _per_engine(rank0, "vllm:prompt_tokens_total")
        assert set(served) == {0, 1} and all(v > 0 for v in served.values()), served
        local = _engine_pids(rank0)
        assert list(local) == [0]  # rank 0 runs one core; rank 1 is the other process
        # SIGTERM to rank 0 stops every core: its own, and rank 1 through the master
        assert rank0.stop() == 0
        assert rank1.wait(60) == 0
        assert not _alive(local[0])
        assert rank0.rpc_dirs() == []
    finally:
        if rank0 is not None:
            rank0.cleanup()
        # rank 1 and the engine it started (its own process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rank1.pid, signal.SIGKILL)
        rank1.wait(30)
        log.close()
