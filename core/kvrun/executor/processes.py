"""Starting, watching and reaping the executor's worker processes.

VLLM_WORKER_MULTIPROC_METHOD picks how (vLLM's meaning): ``fork`` forks this process
(the child inherits the imported modules and runs
:func:`~kvrun.executor.worker_main.run_worker` directly), ``spawn`` starts a fresh
interpreter (``python -m kvrun.executor.worker_main FD``) that reads its start message
from a pipe. Neither goes through multiprocessing.Process: the server's engine process
is a daemonic multiprocessing child, which multiprocessing forbids to have children,
and nothing here is pickled.

Each :class:`WorkerProcess` has a sentinel (a pidfd: readable once the process has
exited) so that the executor's waits end the moment a worker dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from kvrun.errors import ConfigError
from kvrun.executor.messages import WorkerStart, encode

__all__ = [
    "START_METHODS",
    "WorkerProcess",
    "check_start_method",
    "resolve_start_method",
    "start_worker",
]

logger = logging.getLogger(__name__)

START_METHODS = ("fork", "spawn")


def check_start_method(method: str) -> str:
    if method not in START_METHODS:
        raise ConfigError(
            f"VLLM_WORKER_MULTIPROC_METHOD={method!r} is not a start method; accepted: "
            f"{', '.join(START_METHODS)}"
        )
    return method


_PROBE_TIMEOUT_S = 5.0


def forked_openmp_works(threads: int, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a child forked now can run a parallel region on ``threads`` threads.

    GNU libgomp (torch's OpenMP on cpu) keeps its thread pool across fork, but the
    child has none of those threads: once this process has run a parallel region, the
    child's first one deadlocks. A probe child runs one and must finish in time.
    """
    import torch

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(threads)
            code = 0 if float(torch.ones(1 << 20).sum()) == float(1 << 20) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def resolve_start_method(requested: str, threads: int) -> str:
    """The start method to use: ``requested`` (VLLM_WORKER_MULTIPROC_METHOD), except that
    fork becomes spawn, with a warning, where a forked worker could not compute
    (:func:`forked_openmp_works`), as vLLM overrides fork where it is unsafe (an
    initialised CUDA context)."""
    check_start_method(requested)
    if requested == "fork" and not forked_openmp_works(threads):
        logger.warning(
            "VLLM_WORKER_MULTIPROC_METHOD=fork: this process has already run OpenMP "
            "threads, which a forked worker cannot use (its first parallel region would "
            "hang); starting the workers with spawn instead"
        )
        return "spawn"
    return requested


class WorkerProcess:
    """One started worker: its pid, its exit sentinel, and how to stop and reap it."""

    def __init__(self, rank: int, pid: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.rank = rank
        self.pid = pid
        self._popen = popen  # spawn; None for a forked child (reaped with waitpid)
        self.sentinel = os.pidfd_open(pid)
        self._status: int | None = None

    def poll(self) -> int | None:
        """The exit status once the process has exited (negative: the signal), else None."""
        if self._status is None:
            if self._popen is not None:
                self._status = self._popen.poll()
            else:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    return self._status
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def describe_exit(self) -> str:
        status = self.poll()
        if status is None:
            return "is still running"
        if status < 0:
            return f"was killed by signal {signal.Signals(-status).name}"
        return f"exited with status {status}"

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout_s: float) -> bool:
        """True once the process has exited (and is reaped) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        delay = 1e-3
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_worker(start: WorkerStart, method: str, close_in_child: Sequence[int]) -> WorkerProcess:
    """Start the worker for ``start``; ``close_in_child``: the executor's descriptors a
    forked child must not keep (other workers' pipes, every doorbell's write end)."""
    if method == "fork":
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            code = 1
            try:
                for fd in close_in_child:
                    os.close(fd)
                from kvrun.executor.worker_main import run_worker

                code = run_worker(start)
            except BaseException:
                traceback.print_exc()  # run_worker reports its own; this is before it ran
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return WorkerProcess(start.rank, pid, None)
    read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "kvrun.executor.worker_main", str(read_fd)],
            pass_fds=(read_fd, start.doorbell_fd, start.reply_fd)
            + ((start.result_fd,) if start.result_fd >= 0 else ()),
            close_fds=True,
        )
    finally:
        os.close(read_fd)
    with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(encode(start))
    return WorkerProcess(start.rank, popen.pid, popen)
