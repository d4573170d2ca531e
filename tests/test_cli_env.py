"""`kvrun env` and `kvrun env --json`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvrun import envs
from kvrun.env_effects import EFFECTS

REGISTERED = {v.name for v in envs.VARIABLES}


def _kvrun(home: Path, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: none of the caller's VLLM_* (or other registered) variables.
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in REGISTERED and not k.startswith(("VLLM_", "XDG_"))
    }
    environ.update({"HOME": str(home), **extra})
    return subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", "env", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def test_json_lists_every_variable_typed(tmp_path: Path) -> None:
    extra = {
        "VLLM_PORT": "8000",
        "VLLM_USE_MODELSCOPE": "yes",
        "VLLM_CPU_KVCACHE_SPACE": "1.5",
        "VLLM_RAY_BUNDLE_INDICES": "0,1",
        "VLLM_API_KEY": "sk-do-not-print",
    }
    proc = _kvrun(tmp_path, extra, "--json")
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = json.loads(proc.stdout)
    assert [row["name"] for row in rows] == [v.name for v in envs.VARIABLES]
    for row in rows:
        assert sorted(row) == [
            "accepted",
            "default",
            "doc",
            "effect",
            "group",
            "honoured",
            "name",
            "raw",
            "source",
            "type",
            "value",
        ]
    rows_by_name = _by_name(rows)
    assert rows_by_name["VLLM_PORT"] == {
        "name": "VLLM_PORT",
        "value": 8000,
        "default": None,
        "source": "environment",
        "raw": "8000",
        "type": "int",
        "group": "runtime",
        "accepted": "a port number (an integer from 0 to 65535)",
        "doc": "First port for internal distributed communication; more ports count up.",
        "honoured": True,
        "effect": EFFECTS["VLLM_PORT"].describe(),
    }
    picked = {
        name: (rows_by_name[name]["value"], rows_by_name[name]["default"])
        for name in (
            "VLLM_USE_MODELSCOPE",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_RAY_BUNDLE_INDICES",
            "VLLM_RPC_TIMEOUT",
            "VLLM_PLUGINS",
            "VLLM_CONFIG_ROOT",
            "VLLM_API_KEY",
        )
    }
    assert picked == {
        "VLLM_USE_MODELSCOPE": (True, False),
        "VLLM_CPU_KVCACHE_SPACE": (1.5, 0),
        "VLLM_RAY_BUNDLE_INDICES": ([0, 1], []),
        "VLLM_RPC_TIMEOUT": (10000, 10000),
        "VLLM_PLUGINS": (None, None),
        "VLLM_CONFIG_ROOT": (f"{tmp_path}/.config/kvrun", f"{tmp_path}/.config/kvrun"),
        "VLLM_API_KEY": ("<hidden>", None),
    }
    assert rows_by_name["VLLM_API_KEY"]["raw"] == "<hidden>"
    assert "sk-do-not-print" not in proc.stdout
    assert rows_by_name["VLLM_RPC_TIMEOUT"]["source"] == "default"
    assert rows_by_name["VLLM_CPU_KVCACHE_SPACE"]["group"] == "cpu"


def test_text_output_is_grouped(tmp_path: Path) -> None:
    proc = _kvrun(tmp_path, {"VLLM_PORT": "8000", "VLLM_API_KEY": "sk-do-not-print"})
    assert (proc.returncode, proc.stderr) == (0, "")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{len(envs.VARIABLES)} variables, 2 set in the environment"
    headers = [line for line in lines if line.startswith("[")]
    assert headers == [f"[{group}]" for group in envs.GROUPS]
    port = lines.index("  VLLM_PORT = 8000  [environment; default unset]")
    assert lines[port + 1] == (
        "      int: First port for internal distributed communication; more ports count up."
    )
    assert "  VLLM_RPC_TIMEOUT = 10000  [default]" in lines
    assert "  VLLM_API_KEY = <hidden>  [environment; default unset]" in lines
    assert "sk-do-not-print" not in proc.stdout
    assert lines.index("[cpu]") < lines.index("  VLLM_CPU_KVCACHE_SPACE = 0  [default]")


def test_bad_value_exits_with_one_message(tmp_path: Path) -> None:
    proc = _kvrun(tmp_path, {"VLLM_RPC_TIMEOUT": "-5"}, "--json")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "kvrun: error: VLLM_RPC_TIMEOUT='-5' is invalid (below 1); "
        "accepted: an integer >= 1 (milliseconds)\n"
    )


def test_kubernetes_port_exits_with_the_explanation(tmp_path: Path) -> None:
    proc = _kvrun(tmp_path, {"VLLM_PORT": "tcp://10.0.0.1:8000"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == (
        "kvrun: error: VLLM_PORT='tcp://10.0.0.1:8000' is not a port number: it is the "
        "address Kubernetes injects as VLLM_PORT for a Service named `vllm`; rename the "
        "Service, or set VLLM_PORT to a port number (an integer from 0 to 65535)\n"
    )


def test_unknown_variable_is_warned_about(tmp_path: Path) -> None:
    proc = _kvrun(tmp_path, {"VLLM_LOGING_LEVEL": "DEBUG"}, "--json")
    assert proc.returncode == 0
    assert proc.stderr.endswith(
        "unknown variable VLLM_LOGING_LEVEL; did you mean VLLM_LOGGING_LEVEL?\n"
    )
    assert proc.stderr.startswith("WARNING ")
    assert proc.stderr.count("\n") == 1


def test_env_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import contextlib, io, sys; from kvrun.cli.main import main; "
        "out = io.StringIO(); "
        "ctx = contextlib.redirect_stdout(out); ctx.__enter__(); status = main(['env', '--json']); "
        "ctx.__exit__(None, None, None); "
        "print(status, 'torch' in sys.modules, len(out.getvalue()) > 0)"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    environ["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0 False True\n", "")


def test_markdown_matches_the_docs(tmp_path: Path) -> None:
    proc = _kvrun(tmp_path, {}, "--markdown")
    assert proc.returncode == 0
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    )
    assert proc.stdout in doc
    assert proc.stdout.startswith("### install-time\n")
