"""The multiprocess executor: a StepRunner whose model runs in N worker processes.

:class:`MultiprocExecutor` starts one process per rank (tensor x pipeline parallel
ranks on this machine; :mod:`kvrun.executor.processes`), and once built it is a
:class:`~kvrun.engine.step_runner.StepRunner` like the in-process ModelRunner:

- start-up: every worker joins the rendezvous, loads its shard and reports the KV
  blocks its share of the budget holds; the executor takes the minimum over ranks and
  has every rank allocate that many (the scheduler's block ids are the same on all);
- each step's arguments are published once on the shared-memory ring
  (:mod:`kvrun.executor.shm_channel`) as a typed message; every rank runs the step and
  the driver rank (tp_rank 0 of the last stage) writes the step's logits into the
  result area (:mod:`kvrun.executor.result_area`, shared memory sized for the largest
  step's logits) and replies a small typed header on its pipe; :meth:`execute` returns
  views of the area, valid until the next :meth:`execute`; the other ranks send nothing;
- with pipeline parallelism it is a
  :class:`~kvrun.engine.step_runner.ConcurrentStepRunner` of one batch per stage:
  :meth:`submit` publishes a step without waiting (the workers read the ring in order,
  so stage 0 starts step N+1 while stage 1 runs step N, and their untagged send/recv
  pair up in that order), :meth:`collect` awaits the oldest step's reply; the result
  area holds one slot per batch in flight (step N's tensors in slot N mod pp), so the
  views :meth:`collect` returns stay valid until pp more steps are submitted;
- every wait watches every worker's reply pipe and exit sentinel: a worker that raises
  or dies ends the wait at once, with an error naming its rank. A failure after
  start-up makes the executor dead (:class:`ExecutorDeadError`, here and on every later
  call): every worker is killed and reaped and the ring is unlinked before it raises;
  start-up waits are bounded (:attr:`MultiprocSettings.startup_timeout_s`).

:meth:`close` (also run when the executor is collected and at interpreter exit) asks
the workers to stop, kills any that do not within a few seconds, reaps them all and
unlinks the ring. Workers also die with this process (see worker_main).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn, TypeVar

import msgspec

from kvrun.config import EngineArgs
from kvrun.engine.batch import StepLogits
from kvrun.errors import KvrunError
from kvrun.executor.in_flight import StepsInFlight
from kvrun.executor.messages import (
    CommitKVCache,
    Committed,
    InitKVCache,
    KVCacheReady,
    MessageError,
    Reply,
    Shutdown,
    StepResult,
    WorkerFailed,
    WorkerReady,
    WorkerStart,
    decode_reply,
    encode,
    step_message,
    unpack_step_logits,
)
from kvrun.executor.processes import WorkerProcess, check_start_method, start_worker
from kvrun.executor.result_area import ALIGN, ResultArea
from kvrun.executor.shm_channel import BroadcastWriter, ChannelTimeout
from kvrun.lora.slots import ExecutorLoras
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["ExecutorDeadError", "MultiprocExecutor", "MultiprocSettings", "WorkerStartError"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R", bound=msgspec.Struct)
_SHUTDOWN_GRACE_S = 5.0  # how long close() lets workers exit before SIGKILL
_REPLY_PIPE_BYTES = 1 << 20  # reply pipes' size: the default /proc/sys/fs/pipe-max-size


class ExecutorDeadError(RuntimeError):
    """A worker failed or died after start-up: the executor (and its engine) is dead."""


class WorkerStartError(KvrunError):
    """A worker could not start: the rendezvous, the model load or the KV cache failed."""


@dataclass(frozen=True)
class MultiprocSettings:
    """How the executor starts its workers."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    init_method: str  # tcp://HOST:PORT, the torch.distributed rendezvous
    start_method: str = "fork"  # VLLM_WORKER_MULTIPROC_METHOD
    threads_per_worker: int = 1  # torch/OpenMP threads each worker runs
    ring_warning_interval_s: float = 60.0  # VLLM_RINGBUFFER_WARNING_INTERVAL
    dist_timeout_s: float = 120.0  # bound on each rank's rendezvous
    startup_timeout_s: float = 1800.0  # bound on start-up as a whole (loading included)
    ring_slots: int = 16
    ring_slot_bytes: int = 1 << 20
    # the result area: max_num_seqs x vocab x 4 (a step's float32 logits); 0: none, every
    # tensor through the reply pipe
    result_area_bytes: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def driver_rank(self) -> int:
        """tp_rank 0 of the last pipeline stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size


class _Workers:
    """The processes, their pipes and the ring: what must be released, whoever holds
    the executor (a finalizer owns this object, not the executor)."""

    def __init__(self) -> None:
        self.processes: list[WorkerProcess] = []
        self.replies: list[Connection] = []
        self.writer: BroadcastWriter | None = None
        self.area: ResultArea | None = None
        self.closed = False

    def shutdown(self, grace_s: float = _SHUTDOWN_GRACE_S) -> None:
        """Ask every worker to stop, SIGKILL what is left after ``grace_s``, reap all,
        unlink the ring. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.writer is not None and grace_s > 0 and self.processes:
            with contextlib.suppress(ChannelTimeout, OSError):
                self.writer.publish(encode(Shutdown()), timeout_s=min(grace_s, 1.0))
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            if not process.wait(max(0.0, deadline - time.monotonic())):
                process.kill()
        for process in self.processes:
            process.wait(10.0)  # SIGKILL cannot be ignored: this reaps at once
            process.close()
        for conn in self.replies:
            conn.close()
        if self.writer is not None:
            self.writer.close()
        if self.area is not None:
            self.area.close()


class MultiprocExecutor:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over worker processes."""

    returns_hidden_states = True
    # enable_lora: the engine's adapters and their slots on the ranks (set by the builder)
    lora: ExecutorLoras | None = None

    def __init__(
        self,
        args: EngineArgs,
        env: Mapping[str, str],
        settings: MultiprocSettings,
        block_size: int,
    ) -> None:
        """Start the workers and allocate their KV caches; raises WorkerStartError (every
        worker reaped) when a rank cannot start."""
        check_start_method(settings.start_method)
        self.settings = settings
        self.block_size = block_size
        # one batch in flight per pipeline stage (kvrun.engine.step_runner)
        self.max_concurrent_batches = settings.pipeline_parallel_size
        # the numbers of the steps submitted and not collected, oldest first
        self._in_flight: StepsInFlight[int] = StepsInFlight(
            "the mp executor", self.max_concurrent_batches
        )
        self._dead: str | None = None
        self._running = False  # start-up done: a failure now makes the executor dead
        self._workers = _Workers()
        self._finalizer = weakref.finalize(self, self._workers.shutdown)
        try:
            self._start(args, env)
            ready = self._await(WorkerReady, range(settings.world_size), "start-up")
            self.num_kv_blocks = min(r.kv_cache_blocks for r in ready.values())
            self._publish(InitKVCache(self.num_kv_blocks))
            self._await(KVCacheReady, range(settings.world_size), "init_kv_cache")
        except BaseException:
            self._finalizer()
            raise
        self._running = True
        logger.info(
            "mp executor: %d worker processes (%s), %d KV blocks each (the minimum over ranks)",
            settings.world_size,
            settings.start_method,
            self.num_kv_blocks,
        )

    # the StepRunner contract -----------------------------------------------------------
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits:
        # a step still submitted here is one whose caller gave up (KeyboardInterrupt):
        # its reply is skipped when it comes
        self._in_flight.clear()
        self.submit(chunks, prompt_logits_for, hidden_for)
        return self.collect()

    def submit(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> None:
        """Publish one step and return at once (ConcurrentStepRunner)."""
        step = self._in_flight.next_step()
        self._publish(step_message(step, chunks, prompt_logits_for, hidden_for, self.lora))
        self._in_flight.add(step)

    def collect(self) -> StepLogits:
        """The oldest submitted step's logits, once the driver rank replies (views of the
        result area, valid until max_concurrent_batches more steps are submitted)."""
        step = self._in_flight.oldest()
        result = self._await(StepResult, [self.settings.driver_rank], "execute", step)
        reply = result[self.settings.driver_rank]
        if reply.step != step:
            self._die(f"the driver rank answered step {reply.step} to step {step}")
        self._in_flight.pop()
        area = self._workers.area
        try:
            return unpack_step_logits(reply.logits, area.tensor if area is not None else None)
        except (MessageError, ValueError) as exc:
            self._die(f"the driver rank's step result is malformed: {exc}")

    def commit_kv_cache(self) -> int:
        self._publish(CommitKVCache())
        replies = self._await(Committed, range(self.settings.world_size), "commit_kv_cache")
        return sum(r.nbytes for r in replies.values())

    @property
    def peak_in_flight(self) -> int:
        """The most steps submitted and not collected at once."""
        return self._in_flight.peak

    # life cycle ------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._workers.processes]

    @property
    def segment_name(self) -> str | None:
        writer = self._workers.writer
        return writer.name if writer is not None else None

    def close(self) -> None:
        """Stop every worker and release the ring (idempotent)."""
        self._finalizer()

    def _start(self, args: EngineArgs, env: Mapping[str, str]) -> None:
        s = self.settings
        workers = self._workers
        writer = BroadcastWriter(
            s.world_size,
            num_slots=s.ring_slots,
            slot_bytes=s.ring_slot_bytes,
            warn_interval_s=s.ring_warning_interval_s,
            reader_names=[f"worker rank {r}" for r in range(s.world_size)],
        )
        workers.writer = writer
        if s.result_area_bytes > 0:  # a slot per batch in flight (the driver's start_step)
            slot_bytes = -(-s.result_area_bytes // ALIGN) * ALIGN
            workers.area = ResultArea(slot_bytes * s.pipeline_parallel_size)
        area_fd = workers.area.fd if workers.area is not None else -1
        pipes = [os.pipe() for _ in range(s.world_size)]
        for _, write_fd in pipes:  # a reply in one write, logits as bytes included (Linux)
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _REPLY_PIPE_BYTES)
        engine_args: dict[str, Any] = asdict(args)
        try:
            for rank in range(s.world_size):
                start = WorkerStart(
                    rank=rank,
                    local_rank=rank,
                    tensor_parallel_size=s.tensor_parallel_size,
                    pipeline_parallel_size=s.pipeline_parallel_size,
                    init_method=s.init_method,
                    is_driver=rank == s.driver_rank,
                    engine_args=engine_args,
                    env={**env, "LOCAL_RANK": str(rank)},
                    threads=s.threads_per_worker,
                    dist_timeout_s=s.dist_timeout_s,
                    channel=writer.handle,
                    reader_index=rank,
                    doorbell_fd=writer.doorbell_read_fd(rank),
                    reply_fd=pipes[rank][1],
                    parent_pid=os.getpid(),
                    started_by_main_thread=threading.current_thread() is threading.main_thread(),
                    result_fd=area_fd if rank == s.driver_rank else -1,
                )
                # every reply pipe's read end, and the write ends of the workers to come
                others = [pipe[0] for pipe in pipes] + [pipe[1] for pipe in pipes[rank + 1 :]]
                if area_fd >= 0 and rank != s.driver_rank:
                    others.append(area_fd)
                close_in_child = writer.inherited_fds(rank) + others
                workers.processes.append(start_worker(start, s.start_method, close_in_child))
                os.close(pipes[rank][1])  # the child holds the write end now
                workers.replies.append(Connection(pipes[rank][0], writable=False))
        except BaseException:
            for i in range(len(workers.replies), s.world_size):
                for fd in pipes[i]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        writer.close_reader_fds()
        if workers.area is not None:
            workers.area.close_fd()  # the driver holds its own
        logger.info(
            "mp executor: started %d workers by %s (pids %s), %d thread(s) each, rendezvous %s",
            s.world_size,
            s.start_method,
            ", ".join(str(p.pid) for p in workers.processes),
            s.threads_per_worker,
            s.init_method,
        )

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)

    def _publish(self, message: msgspec.Struct) -> None:
        self._check_alive()
        assert self._workers.writer is not None
        self._workers.writer.publish(encode(message), check=self._check_processes)

    def _check_processes(self) -> None:
        for process in self._workers.processes:
            if process.poll() is not None:
                self._worker_exited(process, "while the executor waited to broadcast")

    def _await(
        self, kind: type[_R], ranks: Iterable[int], phase: str, step: int = 0
    ) -> dict[int, _R]:
        """One ``kind`` reply from each of ``ranks``, watching every worker meanwhile;
        step results before ``step`` (steps whose caller gave up) are skipped."""
        self._check_alive()
        pending = set(ranks)
        got: dict[int, _R] = {}
        timeout = self.settings.startup_timeout_s if phase != "execute" else None
        deadline = None if timeout is None else time.monotonic() + timeout
        workers = self._workers
        by_sentinel = {p.sentinel: p for p in workers.processes}
        by_conn = dict(zip(workers.replies, range(len(workers.replies))))
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                ranks_left = ", ".join(str(r) for r in sorted(pending))
                self._fail_start(
                    f"worker rank(s) {ranks_left} did not finish {phase} in {timeout:g} s"
                )
            ready = wait([*workers.replies, *by_sentinel], timeout=left)
            for item in ready:
                if isinstance(item, Connection):
                    rank = by_conn[item]
                    message = self._receive(item, rank, phase)
                    if isinstance(message, StepResult) and message.step < step:
                        continue  # a step whose caller gave up (KeyboardInterrupt)
                    if isinstance(message, kind) and rank in pending:
                        got[rank] = message
                        pending.discard(rank)
                    else:
                        self._die(
                            f"worker rank {rank} sent {type(message).__name__} during {phase}"
                        )
            for item in ready:
                if isinstance(item, int):
                    process = by_sentinel[item]
                    conn = workers.replies[process.rank]
                    while not conn.closed and conn.poll(0):  # its last words first
                        self._receive(conn, process.rank, phase)
                    self._worker_exited(process, f"during {phase}")
        return got

    def _receive(self, conn: Connection, rank: int, phase: str) -> Reply:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            process = self._workers.processes[rank]
            process.wait(5.0)
            self._worker_exited(process, f"during {phase}")
        try:
            message = decode_reply(payload)
        except MessageError as exc:
            self._die(f"worker rank {rank} sent a malformed reply during {phase}: {exc}")
        if isinstance(message, WorkerFailed):
            what = f"worker rank {rank} failed during {message.phase}: {message.error}"
            logger.error("%s\n%s", what, message.traceback.rstrip())
            dead = self._peer_death(rank)
            if dead is not None:  # the root cause: a collective failed because a peer died
                then = what.splitlines()[0][:300]
                what = (
                    f"worker rank {dead.rank} (pid {dead.pid}) {dead.describe_exit()} during "
                    f"{phase}; then {then}"
                )
            if self._running:
                self._die(what)
            self._fail_start(what, user_error=message.user_error)
        return message

    def _peer_death(self, rank: int, within_s: float = 1.0) -> WorkerProcess | None:
        """Another worker killed by a signal now or within ``within_s``: the root cause
        when ``rank`` failed in a collective (its socket reports the peer's death). A
        peer that exits with a status reported its own failure, after ``rank``'s."""
        peers = {p.sentinel: p for p in self._workers.processes if p.rank != rank}
        deadline = time.monotonic() + within_s
        while peers:
            left = deadline - time.monotonic()
            ready = [fd for fd in wait(list(peers), timeout=max(0.0, left)) if isinstance(fd, int)]
            for fd in ready:
                process = peers.pop(fd)
                process.wait(1.0)
                status = process.poll()
                if status is not None and status < 0:
                    return process
            if left <= 0:
                break
        return None

    def _worker_exited(self, process: WorkerProcess, when: str) -> NoReturn:
        what = f"worker rank {process.rank} (pid {process.pid}) {process.describe_exit()} {when}"
        if self._running:
            self._die(what)
        self._fail_start(what)

    def _fail_start(self, what: str, *, user_error: bool = True) -> NoReturn:
        self._workers.shutdown(grace_s=0.0)
        if user_error:
            raise WorkerStartError(f"the mp executor could not start: {what}")
        raise ExecutorDeadError(f"the mp executor could not start: {what}")

    def _die(self, what: str) -> NoReturn:
        """Record the failure, kill and reap every worker, release the ring, raise."""
        self._dead = f"the engine is dead: {what}"
        logger.error("mp executor: %s; stopping every worker", what)
        self._workers.shutdown(grace_s=0.0)
        raise ExecutorDeadError(self._dead)
