"""A worker process of the multiprocess executor: one rank, driven over the broadcast ring.

Started either by ``os.fork`` (VLLM_WORKER_MULTIPROC_METHOD=fork, which calls
:func:`run_worker` in the child) or as ``python -m kvrun.executor.worker_main FD``
(spawn), which reads its :class:`~kvrun.executor.messages.WorkerStart` (msgpack) from
descriptor FD. Either way the worker:

1. dies with its parent (PR_SET_PDEATHSIG, a thread polling the parent pid, EOF on
   its doorbell pipe), ignores
   SIGINT (the executor decides when it stops) and dies on SIGTERM;
2. sets LOCAL_RANK and its thread count, builds its
   :class:`~kvrun.distributed.worker.Worker`, joins the rendezvous, loads its shard and
   replies :class:`WorkerReady` with the KV blocks its share of the budget holds;
3. serves broadcast messages in order until :class:`Shutdown` or the executor's exit;
   only the driver rank replies to steps: its logits go into the executor's result area
   (:mod:`kvrun.executor.result_area`) and the reply names where; the other ranks send
   nothing per step;
4. on any exception replies :class:`WorkerFailed` (rank, phase, error) and exits 1.

Module imports stay light (no torch) so that a spawned worker sets its variables
before torch reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from kvrun.errors import KvrunError
from kvrun.executor.messages import (
    CommitKVCache,
    Committed,
    ExecuteStep,
    InitKVCache,
    KVCacheReady,
    Shutdown,
    StepResult,
    WorkerFailed,
    WorkerReady,
    WorkerStart,
    decode_broadcast,
    decode_start,
    encode,
    pack_step_logits,
    pack_tensor,
)

__all__ = ["main", "run_worker"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


_PARENT_POLL_S = 0.5


def _die_with_parent(parent_pid: int, started_by_main_thread: bool) -> None:
    """Exit when the executor's process does, whatever the worker is doing.

    PR_SET_PDEATHSIG kills at once, but it fires when the *thread* that started us ends,
    so it is used only when that was the main thread (an engine built in a short-lived
    thread must not lose its workers with it); a daemon thread also polls the parent
    pid (reparenting is how Linux says the parent died), which covers every case.
    """
    if started_by_main_thread:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the poll below still ends us
            pass
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="kvrun-parent-watch", daemon=True).start()


def _commit_kv_cache(worker: Any) -> int:
    """Write this rank's whole KV cache once; the bytes written."""
    commit = getattr(worker, "commit_kv_cache", None)
    if commit is not None:
        return int(commit())
    # the Worker's ModelRunner over this rank's cache (kvrun.distributed.worker)
    return int(worker.runner.commit_kv_cache())


def run_worker(start: WorkerStart) -> int:
    """Serve as one rank until told to stop; the process's exit code."""
    _die_with_parent(start.parent_pid, start.started_by_main_thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The worker's view of its place, as vLLM's workers see it.
    os.environ["LOCAL_RANK"] = str(start.local_rank)
    os.environ["OMP_NUM_THREADS"] = str(start.threads)
    reply = Connection(start.reply_fd, readable=False)
    phase = "start-up"
    worker: Any = None
    area: Any = None
    try:
        import torch

        torch.set_num_threads(start.threads)
        from kvrun.config import EngineArgs
        from kvrun.distributed.worker import Worker, WorkerSpec
        from kvrun.executor.shm_channel import BroadcastReader, ChannelClosed

        reader = BroadcastReader(start.channel, start.reader_index, start.doorbell_fd)
        place: Any = pack_tensor
        if start.result_fd >= 0:
            from kvrun.executor.result_area import ResultAreaWriter

            area = ResultAreaWriter(start.result_fd)
            place = area.place
        spec = WorkerSpec(
            rank=start.rank,
            local_rank=start.local_rank,
            tensor_parallel_size=start.tensor_parallel_size,
            pipeline_parallel_size=start.pipeline_parallel_size,
            init_method=start.init_method,
        )
        worker = Worker(EngineArgs(**start.engine_args), start.env, spec)
        phase = "init_distributed"
        worker.init_distributed(start.dist_timeout_s)
        phase = "load_model"
        worker.load_model()
        phase = "kv_cache_blocks"
        reply.send_bytes(encode(WorkerReady(start.rank, worker.kv_cache_blocks())))
        while True:
            phase = "waiting for the executor"
            try:
                message = decode_broadcast(reader.receive())
            except ChannelClosed:
                return 0  # the executor is gone; nothing to answer
            if isinstance(message, ExecuteStep):
                phase = "execute"
                out = worker.execute_step(message)
                if start.is_driver:
                    if out is None:
                        raise RuntimeError("the driver rank's Worker.execute returned no logits")
                    if area is not None:  # a slot per batch in flight (one per stage)
                        slots = start.pipeline_parallel_size
                        area.start_step(message.step % slots, slots)
                    result = StepResult(message.step, pack_step_logits(out, place))
                    reply.send_bytes(encode(result))
            elif isinstance(message, InitKVCache):
                phase = "init_kv_cache"
                worker.init_kv_cache(message.num_blocks)
                reply.send_bytes(encode(KVCacheReady(start.rank)))
            elif isinstance(message, CommitKVCache):
                phase = "commit_kv_cache"
                reply.send_bytes(encode(Committed(start.rank, _commit_kv_cache(worker))))
            elif isinstance(message, Shutdown):
                return 0
    except BaseException as exc:
        failed = WorkerFailed(
            rank=start.rank,
            phase=phase,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            user_error=isinstance(exc, KvrunError),
        )
        with contextlib.suppress(OSError):  # the executor may be gone
            reply.send_bytes(encode(failed))
        return 1
    finally:
        if worker is not None:
            try:
                worker.close()
            except Exception:
                logger.exception("rank %d: Worker.close failed", start.rank)


def main() -> None:
    """``python -m kvrun.executor.worker_main FD``: the spawn start."""
    fd = int(sys.argv[1])
    chunks = []
    while data := os.read(fd, 1 << 16):
        chunks.append(data)
    os.close(fd)
    start = decode_start(b"".join(chunks))
    from kvrun.envs import read_env
    from kvrun.logging_config import configure_logging

    configure_logging(read_env(start.env))
    code = run_worker(start)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
