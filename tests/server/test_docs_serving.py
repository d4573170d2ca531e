"""docs/serving.md against the code: every metric the server exports, every registered
route with whether it needs the key, every flag of `kvrun serve` and `kvrun bench serve`,
and the IPC variables' defaults. Each list is read from the code, so the page cannot
drift from what the server does."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from kvrun import envs
from kvrun.cli import bench_cmd, serve_cmd
from kvrun.scheduling import SchedulerStats
from kvrun.server.app import build_app
from kvrun.server.auth import OPEN_PATHS
from kvrun.server.config import ServerConfig
from kvrun.server.metrics import RequestTimes, ServerMetrics
from kvrun.stats import EngineStats

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
IPC_VARIABLES = (
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_RPC_BASE_PATH",
    "VLLM_RPC_TIMEOUT",
    "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE",
    "VLLM_ENGINE_ITERATION_TIMEOUT_S",
    "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH",
)


def _table_rows(first_cell: str) -> list[list[str]]:
    """Cells of every markdown table row whose first cell is ``first_cell``."""
    rows = []
    for line in DOC.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == first_cell:
                rows.append(cells)
    return rows


def _exported_metric_names() -> list[str]:
    """Every family name in a /metrics answer once every metric has a sample."""
    scheduler = SchedulerStats(
        num_running=1,
        num_waiting=2,
        kv_cache_usage=0.25,
        num_free_blocks=6,
        num_blocks=8,
        prefix_cache_queries=32,
        prefix_cache_hits=16,
        num_preemptions_total=1,
    )
    stats = EngineStats(scheduler, prompt_tokens_total=40, generation_tokens_total=8)
    metrics = ServerMetrics("m", lambda: {0: stats})
    times = RequestTimes(arrival=0.0)
    for now in (0.5, 0.75, 1.0):  # first token, then two more: ttft, itl and tpot all observed
        metrics.on_tokens(times, now, 1)
    metrics.on_finished(times, 1.0, ["length"])
    text = metrics.render().decode()
    return re.findall(r"^# TYPE (\S+) \S+$", text, flags=re.MULTILINE)


METRIC_NAMES = _exported_metric_names()


def test_metric_names_were_read() -> None:
    # the collector and every frontend metric: 8 engine families, 5 frontend families
    # and 5 "_created" gauges
    assert len(METRIC_NAMES) == 18
    assert "vllm:time_to_first_token_seconds" in METRIC_NAMES


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_doc_lists_every_exported_metric(name: str) -> None:
    assert f"`{name}`" in DOC


def _routes() -> list[tuple[str, tuple[str, ...]]]:
    """(path, methods) of every route, the gated ones included."""
    app = build_app(
        ServerConfig(
            api_key="k",
            dev_mode=True,
            profiler_dir="/tmp/traces",
            allow_runtime_lora_updating=True,
        )
    )
    out = []
    for route in app.routes:
        assert isinstance(route, APIRoute | Route)
        methods = tuple(sorted(m for m in route.methods or () if m != "HEAD"))
        out.append((route.path, methods))
    return out


ROUTES = _routes()


@pytest.mark.parametrize(("path", "methods"), ROUTES)
def test_doc_lists_every_route_with_its_key_rule(path: str, methods: tuple[str, ...]) -> None:
    rows = [r for r in _table_rows(", ".join(methods)) if r[1] == f"`{path}`"]
    assert len(rows) == 1, f"no routes-table row for {', '.join(methods)} {path}"
    assert rows[0][2] == ("no" if path in OPEN_PATHS else "yes")


def test_doc_lists_no_route_the_server_lacks() -> None:
    documented = {
        line.split("|")[2].strip().strip("`")
        for line in DOC.splitlines()
        if re.match(r"\| (GET|POST)(, (GET|POST))* \| `/", line)
    }
    assert documented == {path for path, _ in ROUTES}


def _flags(add_arguments: Callable[[argparse.ArgumentParser], None]) -> list[str]:
    """Every --flag the verb's parser accepts, its subcommands' included."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += sub._actions
    return sorted({s for a in actions for s in a.option_strings if s.startswith("--")} - {"--help"})


SERVE_FLAGS = _flags(serve_cmd.add_arguments)
BENCH_FLAGS = _flags(bench_cmd.add_arguments)


def test_flags_were_read() -> None:
    assert {"--api-key", "--root-path", "--shutdown-timeout", "--max-model-len"} <= set(SERVE_FLAGS)
    assert {"--concurrency", "--num-prompts", "--no-ignore-eos"} <= set(BENCH_FLAGS)


@pytest.mark.parametrize("flag", SERVE_FLAGS + BENCH_FLAGS)
def test_doc_lists_every_flag(flag: str) -> None:
    assert re.search(rf"`{re.escape(flag)}`", DOC), flag


@pytest.mark.parametrize("name", IPC_VARIABLES)
def test_doc_states_each_ipc_variable_default(name: str) -> None:
    var = {v.name: v for v in envs.VARIABLES}[name]
    (row,) = _table_rows(f"`{name}`")
    assert row[1].replace("`", "").startswith(var.default_text)


def test_doc_names_the_allowlist() -> None:
    spelled = ", ".join(f"`{p}`" for p in sorted(OPEN_PATHS))
    assert f"**{spelled}**" in DOC
