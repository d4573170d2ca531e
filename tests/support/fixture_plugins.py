"""Installs the fixture plugin distributions in tests/fixtures/ for the tests.

They are built with pip into a private directory (``pip install --target``), not into
the environment, so only tests that put that directory on their path (in-process via
``sys.path``, subprocesses via PYTHONPATH) see them, and other tests' discovery does
not. The directory is keyed by a hash of the fixture sources and reused across runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FIXTURES_DIR", "FIXTURE_NAMES", "install_fixture_plugins"]

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
# Each a directory under FIXTURES_DIR holding one distribution (pyproject.toml).
FIXTURE_NAMES = ("absent", "accel", "broken", "clash", "general", "v99")


def _source_hash(names: Sequence[str]) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for name in names:
        root = FIXTURES_DIR / name
        for path in sorted(root.rglob("*")):
            if path.is_file() and "egg-info" not in str(path) and "__pycache__" not in str(path):
                digest.update(str(path.relative_to(FIXTURES_DIR)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def install_fixture_plugins(names: Sequence[str] = FIXTURE_NAMES) -> Path:
    """The directory holding the named fixtures (default: the plugin-discovery set),
    installed together; built on first use and reused while their sources are unchanged."""
    label = "plugins" if tuple(names) == FIXTURE_NAMES else "-".join(names)
    target = Path(tempfile.gettempdir()) / f"kvrun-fixture-{label}-{_source_hash(names)}"
    if (target / ".complete").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix="kvrun-fixture-build-"))
    try:
        sources = []
        for name in names:
            # Built from a copy so the build leaves no build/ or egg-info in the tree.
            shutil.copytree(
                FIXTURES_DIR / name,
                staging / "src" / name,
                ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"),
            )
            sources.append(str(staging / "src" / name))
        out = staging / "site"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(out),
                *sources,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        (out / ".complete").write_text("ok\n")
        try:
            os.rename(out, target)  # atomic: a concurrent run may win; its copy is equal
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
