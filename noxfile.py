"""nox sessions: tests, lint, typecheck, one per plugin, bench, serve.

Every session installs the CPU build of torch 2.13.0 first (an unpinned resolve
pulls a multi-GB CUDA build), then kvrun. Reuse venvs with ``nox -r``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
TORCH = "torch==2.13.0"
# tpu has its own session below: torch-xla pins another torch.
HARDWARE = ("cuda", "rocm", "openvino", "hpu")


def _install_core(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]", "-e", "plugins/cpu")


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite: what `make test` runs (fixtures and default model included)."""
    session.run("bash", "scripts/bootstrap.sh", session.virtualenv.location, external=True)
    session.run(
        "python",
        "-m",
        "pytest",
        "tests",
        *sorted(str(p) for p in Path("plugins").glob("*/tests")),
        "-q",
        *session.posargs,
        env={"OMP_WAIT_POLICY": "PASSIVE"},  # as `make test`: see the Makefile
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    _install_core(session)
    session.run("mypy")


@nox.session
def cpu(session: nox.Session) -> None:
    """The cpu plugin's own tests (kernels against the core's reference ops)."""
    _install_core(session)
    session.run("python", "-m", "pytest", "plugins/cpu/tests", "-q", *session.posargs)


@nox.session
@nox.parametrize("hw", HARDWARE)
def plugin(session: nox.Session, hw: str) -> None:
    """A hardware plugin with its own stack installed; its tests skip without the hardware."""
    _install_core(session)
    session.install("-e", f"plugins/{hw}")
    session.run("python", "-m", "pytest", f"plugins/{hw}", "-q", *session.posargs)


@nox.session
def tpu(session: nox.Session) -> None:
    """kvrun-tpu on torch-xla, run by XLA on the CPU (PJRT_DEVICE=CPU); not in the default run.

    torch-xla 2.9 pins torch 2.9.0, whose PyPI wheel pulls the CUDA 12.8 libraries
    (nvidia-*; the CPU-only build lives outside PyPI): a 7 GB venv, about 3.5 minutes
    to install here. The tests take about 2 minutes on 2 cores.
    """
    session.install("torch==2.9.0", "torch-xla==2.9.0", "pytest>=8", "pytest-timeout>=2.3")
    # kvrun admits torch>=2.4,<2.15, so installing it keeps torch 2.9.0.
    session.install("-e", ".", "-e", "plugins/tpu")
    session.run(
        "python",
        "-m",
        "pytest",
        "plugins/tpu/tests",
        "-q",
        *session.posargs,
        env={"PJRT_DEVICE": "CPU"},
    )


@nox.session
def ipex(session: nox.Session) -> None:
    """kvrun-cpu's IPEX attention backend (intel-extension-for-pytorch); not in the default run.

    IPEX 2.8.0 runs only on torch 2.8 (its import checks; its metadata does not pin it).
    PyPI's torch 2.8.0 Linux wheel is the CUDA build: it requires the CUDA 12.8 libraries
    (nvidia-*, triton), and it loads them on import even on a CPU (installed with --no-deps
    it fails: "libcudart.so.12: cannot open shared object file"), so they are installed
    too. ``nox --envdir /work/venvs -s ipex`` builds the venv as /work/venvs/ipex.
    """
    # IPEX 2.8's import fails under transformers 5 (it imports MoeModelOutputWithPast);
    # kvrun.testing builds its checkpoints with from_config(dtype=...), new in 4.56.
    session.install("torch==2.8.0", "intel-extension-for-pytorch==2.8.0", "transformers>=4.56,<5")
    # kvrun admits torch>=2.4,<2.15, so installing it keeps torch 2.8.0.
    session.install("-e", ".", "-e", "plugins/cpu", "pytest>=8", "pytest-timeout>=2.3")
    session.run(
        "python",
        "-c",
        "import torch, intel_extension_for_pytorch as ipex; "
        "print('torch', torch.__version__, 'ipex', ipex.__version__)",
    )
    session.run(
        "python",
        "-m",
        "pytest",
        "plugins/cpu/tests/test_ipex.py",
        "plugins/cpu/tests/test_conformance.py",
        "-q",
        *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput and latency against the peers (see BENCHMARKS.md)."""
    session.run("bash", "scripts/bootstrap.sh", session.virtualenv.location, external=True)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def serve(session: nox.Session) -> None:
    """Serve the default model on 127.0.0.1:8000."""
    session.run("bash", "scripts/bootstrap.sh", session.virtualenv.location, external=True)
    session.run("kvrun", "serve", *session.posargs)
