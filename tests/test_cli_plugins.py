"""`kvrun plugins` and `kvrun plugins --json`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvrun.host_cpu import host_cpu
from tests.support.fixture_plugins import install_fixture_plugins

FIXTURES = "cpu,fixtureabsent,fixtureaccel,fixturebroken,fixturev99,fixturegeneral"
BROKEN = "RuntimeError: kvrun_fixture_broken fails on import on purpose"
V99 = (
    "plugin 'fixturev99' (dist kvrun-fixture-v99 0.1.0) implements kvrun plugin API v99; "
    "this kvrun 0.1.0 supports v1"
)


@pytest.fixture(scope="session")
def fixture_site() -> Path:
    return install_fixture_plugins()


def _kvrun(
    site: Path, home: Path, extra: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONPATH": str(site)}
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", "plugins", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def test_json_lists_plugins_and_selection(fixture_site: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    extra = {
        "VLLM_PLUGINS": FIXTURES,
        "KVRUN_FIXTURE_ACCEL_PRESENT": "1",
        "KVRUN_FIXTURE_GENERAL_RECORD": str(record),
    }
    proc = _kvrun(fixture_site, tmp_path, extra, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(out) == ["general", "host_cpu", "platforms", "reason", "selected"]
    assert out["selected"] == "fixtureaccel"
    assert out["reason"] == (
        "VLLM_TARGET_DEVICE is unset: fixtureaccel has the highest priority of the usable "
        "platforms: fixtureaccel (50), cpu (0)"
    )
    platforms = _rows(out["platforms"])
    assert platforms["fixtureaccel"] == {
        "name": "fixtureaccel",
        "distribution": "kvrun-fixture-accel",
        "version": "0.1.0",
        "api_version": 1,
        "entry_point": "kvrun_fixture_accel:probe",
        "usable": True,
        "reason": "probe kvrun_fixture_accel:probe returned "
        "kvrun_fixture_accel.platform.FixtureAccelPlatform",
        "priority": 50,
    }
    assert platforms["fixturebroken"]["reason"] == (
        f"importing kvrun_fixture_broken:probe raised {BROKEN}"
    )
    assert (platforms["fixturev99"]["reason"], platforms["fixturev99"]["api_version"]) == (V99, 99)
    assert platforms["cuda"]["reason"] == (f"not loaded: VLLM_PLUGINS={FIXTURES} does not name it")
    general = _rows(out["general"])
    assert general["fixturegeneral"] == {
        "name": "fixturegeneral",
        "distribution": "kvrun-fixture-general",
        "version": "0.1.0",
        "api_version": 1,
        "entry_point": "kvrun_fixture_general:register",
        "usable": True,
        "reason": "kvrun_fixture_general:register() registered hooks: "
        "kvrun_model_architectures, kvrun_platform_selected",
        "hooks": ["kvrun_model_architectures", "kvrun_platform_selected"],
    }
    assert (general["fixturebroken"]["usable"], general["fixturebroken"]["reason"]) == (
        False,
        f"importing kvrun_fixture_broken:register raised {BROKEN}",
    )
    # Listing runs each general plugin exactly once and selects nothing for real.
    lines = record.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ran in "), lines


def test_json_reports_selection_error(fixture_site: Path, tmp_path: Path) -> None:
    extra = {"VLLM_PLUGINS": FIXTURES, "VLLM_TARGET_DEVICE": "fixtureabsent"}
    proc = _kvrun(fixture_site, tmp_path, extra, "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(out) == ["error", "general", "host_cpu", "platforms", "selected"]
    cpu = host_cpu()
    assert out["host_cpu"] == {"model": cpu.model, "features": list(cpu.features)}
    assert out["selected"] is None
    assert out["error"].split("\n")[0] == (
        "VLLM_TARGET_DEVICE=fixtureabsent, but its platform plugin fixtureabsent "
        "(kvrun-fixture-absent 0.1.0) is not usable: fixture hardware not present"
    )
    assert "  fixturev99 (kvrun-fixture-v99 0.1.0): not usable: " + V99 in out["error"]


def test_text_listing(fixture_site: Path, tmp_path: Path) -> None:
    proc = _kvrun(fixture_site, tmp_path, {"VLLM_PLUGINS": FIXTURES})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"VLLM_TARGET_DEVICE=unset (auto)  VLLM_PLUGINS={FIXTURES}"
    assert lines[1] == f"Host CPU: {host_cpu().describe()}"
    assert lines[3] == "Platform plugins (kvrun.platform_plugins):"
    assert lines[4].split() == [
        "NAME", "DISTRIBUTION", "VERSION", "API", "PRIORITY", "USABLE", "REASON"
    ]  # fmt: skip
    general_at = lines.index("General plugins (kvrun.general_plugins):")
    rows = {line.split()[0]: line.split(None, 6) for line in lines[5 : general_at - 1]}
    assert rows["cpu"] == [
        "cpu", "kvrun-cpu", "0.1.0", "v1", "0", "yes",
        "probe kvrun_cpu:probe returned kvrun_cpu.platform.CpuPlatform",
    ]  # fmt: skip
    assert rows["fixtureabsent"] == [
        "fixtureabsent", "kvrun-fixture-absent", "0.1.0", "v1", "-", "no",
        "fixture hardware not present",
    ]  # fmt: skip
    assert rows["fixturev99"] == [
        "fixturev99", "kvrun-fixture-v99", "0.1.0", "v99", "-", "no", V99
    ]  # fmt: skip
    general = {line.split()[0]: line.split(None, 6) for line in lines[general_at + 2 : -3]}
    assert general["fixturegeneral"] == [
        "fixturegeneral", "kvrun-fixture-general", "0.1.0", "v1", "yes",
        "kvrun_model_architectures,kvrun_platform_selected",
        "kvrun_fixture_general:register() registered hooks: kvrun_model_architectures, "
        "kvrun_platform_selected",
    ]  # fmt: skip
    assert lines[-2:] == [
        "Selected platform: cpu",
        "  VLLM_TARGET_DEVICE is unset: cpu is the only usable platform (priority 0)",
    ]


def test_text_listing_with_no_usable_platform(fixture_site: Path, tmp_path: Path) -> None:
    proc = _kvrun(fixture_site, tmp_path, {"VLLM_PLUGINS": ""})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "VLLM_TARGET_DEVICE=unset (auto)  VLLM_PLUGINS="
    start = lines.index("Selected platform: none")
    assert lines[start + 1] == (
        "  no usable platform: VLLM_TARGET_DEVICE is unset (auto) and no installed "
        "platform plugin is usable."
    )
    assert lines[-1] == (
        '  Install one with pip install "kvrun[DEVICE]", DEVICE one of: cpu, cuda, hpu, '
        "openvino, rocm, tpu"
    )


def test_verb_module_import_is_cheap(tmp_path: Path) -> None:
    code = (
        "import sys, kvrun.cli.plugins_cmd, kvrun.plugins; "
        "print(sorted(m for m in ('torch', 'kvrun_cpu', 'kvrun.platforms') if m in sys.modules))"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout) == (0, "[]\n"), proc.stderr
