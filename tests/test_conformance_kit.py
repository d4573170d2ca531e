"""The conformance kit run the way a vendor runs it, on a third-party backend.

tests/fixtures/vendor_backend is the distribution docs/writing-a-backend.md builds
(platform "acme"); tests/fixtures/vendor_backend_broken is the same backend with an
rms_norm that forgets its weight (platform "acmebroken"); tests/fixtures/
vendor_graph_backend runs the whole model in a ModelExecutor (platform "acmegraph"),
as a graph compiler does. All are installed into a
private --target directory and the kit runs in a pytest subprocess that has only that
directory added to its path, from an empty directory, so it collects the kit alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.fixture_plugins import install_fixture_plugins

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENDOR_FIXTURES = ("vendor_backend", "vendor_backend_broken", "vendor_graph_backend")
KIT = "kvrun.testing.conformance"


@pytest.fixture(scope="module")
def vendor_site() -> Path:
    """The fixture distributions installed with pip into a reused private directory."""
    return install_fixture_plugins(VENDOR_FIXTURES)


def run_kit(site: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pytest -p kvrun.testing.conformance ARGS`` with the vendor site on the path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "VLLM_CONFIG_ROOT": str(tmp_path / "config"),
        # Shared by the runs (and later sessions): the kit caches its tiny model there.
        "VLLM_CACHE_ROOT": str(Path(tempfile.gettempdir()) / "kvrun-conformance-kit-cache"),
    }
    workdir = tmp_path / "run"
    workdir.mkdir()
    command = [sys.executable, "-m", "pytest", "-p", KIT, "-p", "no:cacheprovider"]
    return subprocess.run(
        [*command, "-W", "error", "-v", "-rfEs", "--tb=short", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def outcomes(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """test id (after the class) -> PASSED/FAILED/ERROR/SKIPPED/..., from the -v lines."""
    found = re.findall(
        r"::TestKvrunConformance::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b",
        result.stdout,
    )
    return dict(found)


def test_the_vendor_backend_passes_the_whole_kit(vendor_site: Path, tmp_path: Path) -> None:
    result = run_kit(vendor_site, tmp_path, "--kvrun-platform=acme")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    got = outcomes(result)
    assert set(got.values()) == {"PASSED"}
    ops = [f"{op}-{shape}" for op in ("rms_norm",) for shape in ("1x64", "7x33", "32x256")]
    ops += [f"silu_and_mul-{shape}" for shape in ("1x64", "13x96")]
    expected = {
        "test_contract_entry_points",
        "test_contract_probe",
        "test_contract_identity",
        "test_contract_attention_backends",
        "test_contract_ops",
        "test_greedy_parity[ACME]",
        "test_greedy_parity[REFERENCE]",
        *(f"test_op_matches_reference[{op}-{d}]" for op in ops for d in ("float32", "bfloat16")),
        *(
            f"test_{name}[{d}]"
            for name in (
                "kv_plan_within_budget",
                "kv_refuses_budget_below_one_sequence",
                "kv_allocation_matches_plan",
            )
            for d in ("float32", "bfloat16")
        ),
        *(
            f"test_attention_matches_reference[{backend}-{spec}-{scenario}-{d}]"
            for backend in ("ACME", "REFERENCE")
            for spec in ("4q4kv-d16", "4q2kv-d32", "8q1kv-d64")
            for scenario in ("prefill", "decode", "chunked-prefill", "prefix-hit")
            for d in ("float32", "bfloat16")
        ),
        # the latent cache: only REFERENCE of the two computes latent_kv
        *(
            f"test_attention_matches_reference[REFERENCE-4q1kv-d48-latent32-{scenario}-{d}]"
            for scenario in ("prefill", "decode", "chunked-prefill", "prefix-hit")
            for d in ("float32", "bfloat16")
        ),
    }
    # Exactly these: the ops acme leaves to the reference are not tested as acme's.
    assert set(got) == expected
    assert (
        result.stdout.rstrip().splitlines()[-1].startswith("====")
        and " 79 passed" in (result.stdout.rstrip().splitlines()[-1])
    )


def test_a_wrong_rms_norm_fails_the_kit_naming_the_op(vendor_site: Path, tmp_path: Path) -> None:
    result = run_kit(
        vendor_site, tmp_path, "--kvrun-platform=acmebroken", "-k", "contract or norm or parity"
    )
    assert result.returncode == 1, result.stdout[-6000:]
    got = outcomes(result)
    failed = {test for test, outcome in got.items() if outcome == "FAILED"}
    assert failed == {
        *(
            f"test_op_matches_reference[rms_norm-{shape}-{d}]"
            for shape in ("1x64", "7x33", "32x256")
            for d in ("float32", "bfloat16")
        ),
        "test_greedy_parity[ACME]",
        "test_greedy_parity[REFERENCE]",
    }
    assert {t for t, o in got.items() if o == "PASSED"} == {
        "test_contract_entry_points",
        "test_contract_probe",
        "test_contract_identity",
        "test_contract_attention_backends",
        "test_contract_ops",
    }
    assert "op 'rms_norm' [1x64, float32]: differs from the reference (float32)" in result.stdout
    assert "greedy parity with the reference on a tiny random Llama (float32" in result.stdout


def test_a_whole_model_executor_skips_kernel_checks_and_runs_parity(
    vendor_site: Path, tmp_path: Path
) -> None:
    result = run_kit(
        vendor_site, tmp_path, "--kvrun-platform=acmegraph", "-k", "matches_reference or parity"
    )
    assert result.returncode == 0, result.stdout[-6000:]
    got = outcomes(result)
    assert got.pop("test_greedy_parity[ACME]") == "PASSED"  # the default backend only
    assert len(got) == 10 + 48 + 8  # acme's op cases, attention and latent cases, all skipped
    assert set(got.values()) == {"SKIPPED"}
    assert (
        "platform 'acmegraph' runs the whole model in its own executor: its kernels and "
        "attention are covered by test_greedy_parity"
    ) in result.stdout


def test_an_unknown_platform_fails_the_contract_with_what_is_installed(
    vendor_site: Path, tmp_path: Path
) -> None:
    result = run_kit(vendor_site, tmp_path, "--kvrun-platform=nosuch", "-k", "contract")
    assert result.returncode == 1, result.stdout[-6000:]
    assert set(outcomes(result).values()) == {"FAILED", "ERROR"}
    assert "no entry point named 'nosuch' in the group 'kvrun.platform_plugins'" in result.stdout
    installed = re.search(r"installed: ([^(]+) \(is the distribution installed\?\)", result.stdout)
    assert installed is not None and {"acme", "acmebroken", "acmegraph", "cpu"} <= set(
        installed.group(1).split(", ")
    )


def test_the_plugin_is_inert_without_the_option(vendor_site: Path, tmp_path: Path) -> None:
    result = run_kit(vendor_site, tmp_path)
    assert result.returncode == 5, result.stdout  # pytest's "no tests collected"
    assert "no tests ran" in result.stdout


def test_the_walk_through_shows_the_fixture_files_byte_for_byte() -> None:
    repo = FIXTURES.parents[1]
    doc = (repo / "docs" / "writing-a-backend.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```\n", doc, re.DOTALL)
    shown = {path: text for path, text in blocks}
    package = "tests/fixtures/vendor_backend/acme_kvrun_backend"
    assert set(shown) == {
        "tests/fixtures/vendor_backend/pyproject.toml",
        *(f"{package}/{name}" for name in ("__init__.py", "ops.py", "attention.py", "platform.py")),
        "plugins/cpu/tests/test_conformance.py",
    }
    for path, text in shown.items():
        assert text == (repo / path).read_text(encoding="utf-8"), f"{path} differs from the doc"


def test_a_whole_model_executor_passes_the_kv_plan_checks(
    vendor_site: Path, tmp_path: Path
) -> None:
    # The acmegraph executor sizes an explicit cache with kvrun.platforms.plan_exact_kv_blocks.
    result = run_kit(vendor_site, tmp_path, "--kvrun-platform=acmegraph", "-k", "test_kv_")
    assert result.returncode == 0, result.stdout[-6000:]
    got = outcomes(result)
    assert sorted(got) == sorted(
        f"test_{name}[{d}]"
        for name in (
            "kv_plan_within_budget",
            "kv_refuses_budget_below_one_sequence",
            "kv_allocation_matches_plan",
        )
        for d in ("float32", "bfloat16")
    )
    assert set(got.values()) == {"PASSED"}
