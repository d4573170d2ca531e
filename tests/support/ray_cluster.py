"""A local Ray cluster for tests: ``ray start`` processes on 127.0.0.1, stopped by pid.

Use it inside a loopback-only network namespace (``unshare -n``; Ray otherwise binds the
machine's outward address). :class:`RayCluster` gives Ray a temporary directory of its
own (RAY_TMPDIR, a short path: Ray's unix sockets live under it), so nothing in it sees
or touches another Ray instance on this machine. ``ray stop`` is not used: it kills
every Ray process of the machine; :meth:`RayCluster.stop` kills only the processes of
this cluster, found by their network namespace and their RAY_TMPDIR, and waits for them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RayCluster", "processes_with_environ", "ray_cli"]


def ray_cli() -> str:
    """The ``ray`` command of this interpreter's environment."""
    return str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _netns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def processes_with_environ(entry: str) -> list[int]:
    """Pids of the processes in this network namespace whose environment holds
    ``entry`` (``NAME=value``), but for this process."""
    mine, me = _netns("self"), os.getpid()
    needle = entry.encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me or _netns(proc.name) != mine:
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ + b"\0":
            found.append(int(proc.name))
    return found


class RayCluster:
    """A head node and ``workers`` more nodes, ``cpus`` CPUs each, on 127.0.0.1."""

    def __init__(self, nodes: int = 2, cpus: int = 1, timeout_s: float = 120.0) -> None:
        self.nodes = nodes
        self.cpus = cpus
        self.timeout_s = timeout_s
        self.tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "RAY_TMPDIR": self.tmpdir,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def marker(self) -> str:
        """The environment entry every process of this cluster carries."""
        return f"RAY_TMPDIR={self.tmpdir}"

    def start(self) -> RayCluster:
        ray = ray_cli()
        head = [ray, "start", "--head", "--port", str(self.port), "--num-cpus", str(self.cpus),
                "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                "--disable-usage-stats"]  # fmt: skip
        self._run(head)
        for _ in range(self.nodes - 1):
            self._run([ray, "start", "--address", self.address, "--num-cpus", str(self.cpus),
                       "--node-ip-address", "127.0.0.1"])  # fmt: skip
        return self

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=self.timeout_s
        )
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    def pids(self) -> list[int]:
        """The processes of this cluster now alive."""
        return processes_with_environ(self.marker)

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """SIGKILL every process of this cluster and wait for them to go (bounded);
        the pids still there at the end (none when all went)."""
        deadline = time.monotonic() + timeout_s
        left = self.pids()
        while left and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            for pid in left:  # reap the ones that are our children
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            left = [p for p in self.pids() if _state(p) not in ("Z", None)]
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return left

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]
