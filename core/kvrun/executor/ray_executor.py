"""The Ray executor: a StepRunner whose ranks are Ray actors in a placement group.

:class:`RayExecutor` (``distributed_executor_backend="ray"``) is a
:class:`~kvrun.engine.step_runner.StepRunner` like the mp executor, with every rank a
:class:`~kvrun.executor.ray_actor.RankActor` (one process each, on any node of a Ray
cluster):

- the cluster: kvrun joins one when Ray's own rules find it (RAY_ADDRESS, else the
  cluster ``ray start`` last started on this machine), else starts a local one
  (``ray.init`` with this machine's cores, on the node address kvrun's collectives use,
  logged) and shuts it down at :meth:`close`; a cluster kvrun joined is left running;
- the placement group: one bundle per rank (``{"CPU": threads}`` on cpu,
  ``{"GPU": VLLM_RAY_PER_WORKER_GPUS}`` on GPU platforms), rank r on bundle
  VLLM_RAY_BUNDLE_INDICES[r] (unset: bundle r); a group that cannot be placed in
  :attr:`RaySettings.placement_timeout_s` is an error naming what it asked and what
  the cluster has;
- start-up: rank 0's actor names the rendezvous (VLLM_HOST_IP, else its node's IP as
  Ray reports it; the first free port from VLLM_PORT), every actor joins it and loads
  its shard, the executor takes the minimum of their KV block counts and has every
  rank allocate that many; a failure names the rank, bounded by
  :attr:`RaySettings.startup_timeout_s`;
- steps are SPMD: the engine process runs no rank; every actor gets the step's bytes (a
  typed :class:`~kvrun.executor.messages.ExecuteStep`, msgpack) and the driver rank
  (tp_rank 0 of the last stage) answers a :class:`~kvrun.executor.messages.StepResult`.
  The ranks on the engine's Ray node take the node-local data path
  (:mod:`kvrun.executor.ray_local`, unless :attr:`RaySettings.node_local` is off): the
  step is published once on the mp executor's shared-memory ring, the driver's logits
  come back in the result area with a typed header on its Unix socket connection, no
  Ray call per step (a Ray call costs milliseconds: most of a small model's decode
  step). Ranks on other nodes get each step as one actor call, and a driver rank there
  answers with its float32 logits beside the header as numpy arrays (one copy out of
  Ray's object store). A local rank that cannot attach (e.g. a Ray client driver, not
  on the node it appears on, or an engine whose TMPDIR is private to it, as under
  systemd's PrivateTmp or in a container of its own, so that its actors cannot reach
  its Unix socket) makes every rank fall back to actor calls, with one warning
  (tests/executor/test_ray_attach_fallback.py).
  Under VLLM_USE_RAY_COMPILED_DAG=1 the steps go through a Ray compiled graph
  (InputNode -> every actor's ``execute`` -> MultiOutputNode), over Ray's shared-memory
  channels on cpu, where every rank must be on the engine's node (across nodes Ray
  2.60's channels hung: refused, with the reason); the driver's logits still come back
  in the result area and its header on its connection, where the engine sleeps until
  it comes (waiting in Ray's channel read cost the engine ~8 ms of CPU per step on
  2 cores: it busy-waits), and only then reads the graph's empty outputs;
- pipeline parallelism: the executor is a
  :class:`~kvrun.engine.step_runner.ConcurrentStepRunner` with one batch in flight per
  stage (``max_concurrent_batches`` = the pipeline parallel size): :meth:`submit`
  publishes a step (the ring for local ranks; an actor call for each remote rank, whose
  references wait in a FIFO, as Ray runs one caller's calls on an actor in order; a
  compiled graph's ``execute``, compiled with ``_max_inflight_executions`` of at least
  that many) and returns; :meth:`collect` waits for the oldest step's driver reply.
  The result area has a slot per step in flight (step N in slot N mod pp);
- faults: an actor that dies or raises makes the executor dead
  (:class:`~kvrun.executor.mp.ExecutorDeadError`, here and on every later call): the
  other actors are killed, the placement group removed and the ring unlinked before it
  raises. The waits watch every rank: a local rank's connection (its end-of-file is its
  process's death, its WorkerFailed a failure) and every Ray reference in flight (a
  remote actor's, and each local actor's long ``serve_local`` call), so a dead actor
  ends them at once (a remote one within half a second).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn, TypeVar

import msgspec
import torch

from kvrun.config import EngineArgs
from kvrun.engine.batch import StepLogits
from kvrun.errors import ConfigError, KvrunError
from kvrun.executor.in_flight import StepsInFlight
from kvrun.executor.messages import (
    AttachedTensor,
    CommitKVCache,
    Committed,
    MessageError,
    Reply,
    SharedTensor,
    StepResult,
    WorkerFailed,
    decode_reply,
    dtype_named,
    encode,
    step_message,
    unpack_step_logits,
)
from kvrun.executor.mp import ExecutorDeadError, WorkerStartError
from kvrun.executor.ray_local import LocalRanks
from kvrun.lora.slots import ExecutorLoras
from kvrun.scheduling.output import ScheduledChunk

__all__ = [
    "RayExecutor",
    "RaySettings",
    "bundle_indices",
    "import_ray",
]

logger = logging.getLogger(__name__)

_R = TypeVar("_R", bound=msgspec.Struct)
_T = TypeVar("_T")
_WATCH_S = 0.5  # while waiting on local ranks, how often Ray's references are looked at
_ATTACH_TIMEOUT_S = 60.0  # bound on the local ranks' attaching to the node-local path


def import_ray() -> Any:
    """The ray module; a ConfigError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "distributed_executor_backend='ray' needs Ray, which is not installed "
            f'({exc}); install it with: pip install "kvrun[ray]"'
        ) from None
    return ray


def bundle_indices(indices: Sequence[int], world_size: int) -> list[int]:
    """The placement-group bundle of each rank: VLLM_RAY_BUNDLE_INDICES (one distinct
    index per rank, each below ``world_size``, the group's bundle count) or, empty,
    rank r on bundle r."""
    if not indices:
        return list(range(world_size))
    text = ",".join(str(i) for i in indices)
    if len(indices) != world_size:
        raise ConfigError(
            f"VLLM_RAY_BUNDLE_INDICES={text} names {len(indices)} bundle(s) but the engine "
            f"has {world_size} rank(s) (tensor x pipeline parallel); accepted: {world_size} "
            f"distinct indices in 0..{world_size - 1}, one per rank"
        )
    repeated = sorted({i for i in indices if list(indices).count(i) > 1})
    if repeated:
        raise ConfigError(
            f"VLLM_RAY_BUNDLE_INDICES={text} repeats {', '.join(map(str, repeated))}; "
            f"accepted: {world_size} distinct indices in 0..{world_size - 1}"
        )
    beyond = [i for i in indices if not 0 <= i < world_size]
    if beyond:
        raise ConfigError(
            f"VLLM_RAY_BUNDLE_INDICES={text}: {', '.join(map(str, beyond))} is past the "
            f"placement group's {world_size} bundle(s); accepted: indices in "
            f"0..{world_size - 1}"
        )
    return list(indices)


@dataclass(frozen=True)
class RaySettings:
    """How the executor places and drives its actors."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    threads_per_worker: int = 1  # torch/OpenMP threads (and CPUs reserved) per actor
    gpus_per_worker: float = 0.0  # VLLM_RAY_PER_WORKER_GPUS on GPU platforms; 0 on cpu
    bundles: list[int] = field(default_factory=list)  # VLLM_RAY_BUNDLE_INDICES
    compiled_graph: bool = False  # VLLM_USE_RAY_COMPILED_DAG
    overlap_gpu_communication: bool = False  # VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM
    local_cpus: int | None = None  # CPUs of a local cluster kvrun starts (None: the machine's)
    node_ip: str | None = None  # the address a local cluster kvrun starts binds
    dist_timeout_s: float = 120.0  # bound on each rank's rendezvous
    startup_timeout_s: float = 1800.0  # bound on start-up as a whole (loading included)
    placement_timeout_s: float = 120.0  # bound on placing the group's bundles
    # the ranks on the engine's node take the node-local data path (kvrun.executor.ray_local)
    node_local: bool = True
    # its result area: max_num_seqs x vocab x 4 (a step's float32 logits); 0: none
    result_area_bytes: int = 0
    ring_warning_interval_s: float = 60.0  # VLLM_RINGBUFFER_WARNING_INTERVAL
    # bound on one step through a compiled graph: Ray's RAY_CGRAPH_get_timeout when set
    compiled_step_timeout_s: float = field(
        default_factory=lambda: float(os.environ.get("RAY_CGRAPH_get_timeout") or 600.0)  # noqa: SIM112
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def driver_rank(self) -> int:
        """tp_rank 0 of the last pipeline stage."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    def bundle(self) -> dict[str, float]:
        if self.gpus_per_worker > 0:
            return {"GPU": self.gpus_per_worker}
        return {"CPU": float(self.threads_per_worker)}


@dataclass
class _InFlight:
    """A step submitted and not yet collected."""

    step: int
    remote: dict[int, Any]  # rank -> its actor call of this step (plain calls)
    graph_refs: Any = None  # the compiled graph's references of this step


class _Placed:
    """What the executor holds in Ray: released by :meth:`release`, whoever holds the
    executor (a finalizer owns this object, not the executor)."""

    def __init__(self, ray: Any) -> None:
        self.ray = ray
        self.started_ray = False  # this process called ray.init (shut down at the end)
        self.started_cluster = False  # ... and that started a local cluster
        self.placement_group: Any = None
        self.actors: list[Any] = []
        self.dag: Any = None
        self.local: LocalRanks | None = None  # the node-local data path
        self.serve_refs: dict[int, Any] = {}  # local rank -> its serve_local call
        self.released = False

    def kill_actors(self, teardown_first: bool = False) -> None:
        """Kill every actor, tear the graph down, remove the placement group, unlink the
        ring (idempotent). ``teardown_first``: stop the graph's loops before the kill (a
        clean close; after a death the teardown would wait for the dead actor's loop)."""
        ray = self.ray
        dag, self.dag = self.dag, None
        if dag is not None and teardown_first:
            with contextlib.suppress(Exception):
                dag.teardown()
            dag = None
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if dag is not None:
            with contextlib.suppress(Exception):
                dag.teardown(kill_actors=True)
        if self.placement_group is not None:
            group, self.placement_group = self.placement_group, None
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(group)
        self.serve_refs = {}
        if self.local is not None:
            self.local.close()

    def release(self) -> None:
        """kill_actors, then leave the cluster (a local cluster kvrun started stops)."""
        if self.released:
            return
        self.released = True
        self.kill_actors(teardown_first=True)
        if self.started_ray:
            with contextlib.suppress(Exception):
                self.ray.shutdown()


def _connect(ray: Any, placed: _Placed, settings: RaySettings) -> None:
    """Join the cluster Ray's rules find, else start a local one."""
    if ray.is_initialized():
        logger.info("ray executor: using the Ray connection this process already has")
        return
    from ray._private.services import canonicalize_bootstrap_address

    address = canonicalize_bootstrap_address(None)  # type: ignore[arg-type]
    if address is not None:
        logger.info("ray executor: joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        placed.started_ray = True
        return
    cpus = settings.local_cpus or os.cpu_count() or 1
    cpus = max(cpus, settings.world_size * settings.threads_per_worker)
    # a local cluster's usage report would go to Ray's servers: off unless asked for
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logger.info(
        "ray executor: no Ray cluster found (RAY_ADDRESS unset, none started by `ray start` "
        "here): starting a local one with %d CPU(s) on %s; it stops with the engine",
        cpus,
        settings.node_ip or "Ray's choice of address",
    )
    kwargs: dict[str, Any] = {
        "num_cpus": cpus,
        "include_dashboard": False,
        # a local cluster's background work takes CPU from the ranks on a small machine
        # (idle: ~7% of a core measured on 2 cores, ~5% with these): no idle worker
        # started ahead (the actors are the only tasks), metrics (which nothing here
        # reads) reported every 10 minutes rather than every 10 s
        "_system_config": {
            "prestart_worker_first_driver": False,
            "metrics_report_interval_ms": 600_000,
        },
    }
    if settings.node_ip is not None:
        kwargs["_node_ip_address"] = settings.node_ip
    ray.init(**kwargs)
    placed.started_ray = placed.started_cluster = True


class RayExecutor:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over Ray actors."""

    returns_hidden_states = True
    # enable_lora: the engine's adapters and their slots on the ranks (set by the builder)
    lora: ExecutorLoras | None = None

    def __init__(
        self,
        args: EngineArgs,
        env: Mapping[str, str],
        settings: RaySettings,
        block_size: int,
    ) -> None:
        """Place the actors, start their ranks and allocate their KV caches; raises
        WorkerStartError (every actor killed, the group removed) when a rank cannot start."""
        ray = import_ray()
        self._ray = ray
        self.settings = settings
        self.block_size = block_size
        self._bundles = bundle_indices(settings.bundles, settings.world_size)
        self._dead: str | None = None
        self._running = False
        self._placed = _Placed(ray)
        self._finalizer = weakref.finalize(self, self._placed.release)
        self.pids: list[int] = []  # each rank's actor process
        self.node_ids: list[str] = []  # each rank's Ray node
        self.node_ips: list[str] = []
        self.local_ranks: list[int] = []  # ranks on the node-local data path (ray_local)
        self._remote: dict[int, Any] = {}  # rank -> its actor call of commit_kv_cache
        # one batch in flight per pipeline stage (kvrun.engine.step_runner)
        self.max_concurrent_batches = settings.pipeline_parallel_size
        self._in_flight: StepsInFlight[_InFlight] = StepsInFlight(
            "the ray executor", self.max_concurrent_batches
        )
        # the driver's StepResults that came while the engine waited for something else
        self._early: deque[Reply] = deque()
        try:
            _connect(ray, self._placed, settings)
            self._start(ray, args, env)
        except BaseException:
            self._finalizer()
            raise
        self._running = True

    # the StepRunner contract -----------------------------------------------------------
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits:
        # a step still in flight here is one whose caller gave up (KeyboardInterrupt):
        # its reply is taken and dropped, so that the ranks stay in step
        while self._in_flight:
            self.collect()
        self.submit(chunks, prompt_logits_for, hidden_for)
        return self.collect()

    def submit(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> None:
        """Publish one step to every rank and return at once (ConcurrentStepRunner)."""
        self._check_alive()
        step = self._in_flight.next_step()
        payload = encode(step_message(step, chunks, prompt_logits_for, hidden_for, self.lora))
        if self._placed.dag is not None:
            entry = _InFlight(step, {}, self._graph_call(lambda: self._placed.dag.execute(payload)))
        else:
            local = self._placed.local
            if self.local_ranks:
                assert local is not None
                local.publish(payload, check=lambda: self._poll_local("execute"))
            remote = {
                rank: self._placed.actors[rank].execute.remote(payload)
                for rank in self._remote_ranks()
            }
            entry = _InFlight(step, remote)
        self._in_flight.add(entry)

    def collect(self) -> StepLogits:
        """The oldest submitted step's logits, once the driver rank replies (views of the
        result area, valid until max_concurrent_batches more steps are submitted, or
        copies of what came through Ray)."""
        self._check_alive()
        entry = self._in_flight.oldest()
        step = entry.step
        driver = self.settings.driver_rank
        arrays: Sequence[Any] = ()
        message: Reply | None = None
        reply: Any = None
        if self._placed.dag is not None:
            outputs, message = self._compiled_collect(entry.graph_refs)
            reply = outputs[driver]
        else:
            if driver in self.local_ranks:
                message = self._driver_reply()
            replies = self._gather_ranks(entry.remote, "execute")
            reply = replies.get(driver)
        self._in_flight.pop()
        try:
            if message is None:
                if not (
                    isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], bytes)
                ):
                    self._die(f"the driver rank answered {type(reply).__name__} to step {step}")
                header, arrays = reply
                message = decode_reply(header)
            if not isinstance(message, StepResult) or message.step != step:
                self._die(f"the driver rank answered {type(message).__name__} to step {step}")
            return unpack_step_logits(message.logits, lambda ref: self._outside(ref, arrays))
        except (MessageError, ValueError) as exc:
            self._die(f"the driver rank's step result is malformed: {exc}")

    @property
    def peak_in_flight(self) -> int:
        """The most steps submitted and not collected at once."""
        return self._in_flight.peak

    def _driver_reply(self) -> Reply:
        """The local driver rank's next reply on its connection (one that came early,
        while the engine watched the ranks for something else, first)."""
        if self._early:
            return self._early.popleft()
        driver = self.settings.driver_rank
        return self._await_local(StepResult, [driver], "execute")[driver]

    def commit_kv_cache(self) -> int:
        self._check_alive()
        local = self._placed.local
        committed: dict[int, Committed] = {}
        if self.local_ranks:
            assert local is not None
            local.publish(encode(CommitKVCache()), check=lambda: self._poll_local("commit"))
        self._remote = {
            rank: self._placed.actors[rank].commit_kv_cache.remote()
            for rank in self._remote_ranks()
        }
        if self.local_ranks:
            committed = self._await_local(Committed, self.local_ranks, "commit_kv_cache")
        values = self._gather_ranks(self._remote, "commit_kv_cache")
        self._remote = {}
        return sum(int(n) for n in values.values()) + sum(c.nbytes for c in committed.values())

    @property
    def segment_name(self) -> str | None:
        """The node-local step ring's /dev/shm segment (None when no rank uses it)."""
        local = self._placed.local
        return local.segment_name if local is not None else None

    def _remote_ranks(self) -> list[int]:
        """The ranks that get each step as an actor call."""
        return [r for r in range(self.settings.world_size) if r not in self.local_ranks]

    def _outside(self, ref: SharedTensor | AttachedTensor, arrays: Sequence[Any]) -> torch.Tensor:
        """A tensor the driver's reply points to: in the result area (a view, valid
        until the next step) or among the arrays that came with it."""
        if isinstance(ref, SharedTensor):
            local = self._placed.local
            if local is None or local.area is None:
                raise MessageError("the driver rank named a result area this executor has not")
            return local.area.tensor(ref)
        return _attached(ref, arrays)

    # life cycle ------------------------------------------------------------------------
    @property
    def started_cluster(self) -> bool:
        """Whether this executor started the (local) Ray cluster it runs on."""
        return self._placed.started_cluster

    def close(self) -> None:
        """Kill every actor, remove the placement group, leave the cluster (a local one
        kvrun started stops). Idempotent."""
        self._finalizer()

    def _start(self, ray: Any, args: EngineArgs, env: Mapping[str, str]) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from kvrun.executor.ray_actor import RankActor

        s = self.settings
        placed = self._placed
        bundle = s.bundle()
        group = placement_group([dict(bundle) for _ in range(s.world_size)], strategy="PACK")
        placed.placement_group = group
        try:
            ray.get(group.ready(), timeout=s.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerStartError(
                f"the ray executor could not start: a placement group of {s.world_size} "
                f"bundle(s) of {bundle} was not placed in {s.placement_timeout_s:g} s; the "
                f"cluster has {ray.cluster_resources()} ({ray.available_resources()} free)"
            ) from None
        actor_cls = ray.remote(RankActor)
        for rank in range(s.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                group,
                placement_group_bundle_index=self._bundles[rank],
                placement_group_capture_child_tasks=True,
            )
            options: dict[str, Any] = {
                "scheduling_strategy": strategy,
                "max_restarts": 0,
                "max_task_retries": 0,
            }
            if s.gpus_per_worker > 0:
                options.update(num_cpus=0, num_gpus=s.gpus_per_worker)
            else:
                options.update(num_cpus=s.threads_per_worker)
            placed.actors.append(
                actor_cls.options(**options).remote(dict(env), s.threads_per_worker)
            )
        where = self._gather(
            [a.placement.remote() for a in placed.actors], "placement", s.startup_timeout_s
        )
        self.pids = [int(w[2]) for w in where]
        self.node_ids = [str(w[0]) for w in where]
        self.node_ips = [str(w[1]) for w in where]
        # LOCAL_RANK: a rank's index among the ranks on its node, in rank order
        seen: dict[str, int] = {}
        local_ranks = []
        for node, _, _ in where:
            local_ranks.append(seen.get(node, 0))
            seen[node] = seen.get(node, 0) + 1
        if s.compiled_graph and s.gpus_per_worker == 0:
            here = ray.get_runtime_context().get_node_id()
            away = [rank for rank, (node, _, _) in enumerate(where) if node != here]
            if away:
                raise WorkerStartError(
                    "the ray executor could not start: VLLM_USE_RAY_COMPILED_DAG=1 on cpu "
                    "needs every rank on the engine's node, but rank(s) "
                    f"{', '.join(map(str, away))} were placed on other nodes: across nodes "
                    "Ray 2.60's shared-memory channels hung (the engine and every actor "
                    "blocked reading their channels, the step never delivered); unset "
                    "VLLM_USE_RAY_COMPILED_DAG to drive the actors by plain calls"
                )
        host, port = self._gather(
            [placed.actors[0].rendezvous_address.remote()], "rendezvous", s.startup_timeout_s
        )[0]
        init_method = f"tcp://{host}:{port}"
        logger.info(
            "ray executor: %d actor(s) (tensor %d x pipeline %d) on %d node(s), bundles %s of "
            "%s, pids %s on %s; rendezvous %s",
            s.world_size, s.tensor_parallel_size, s.pipeline_parallel_size, len(seen),
            self._bundles, bundle, self.pids, self.node_ips, init_method,
        )  # fmt: skip
        engine_args = asdict(args)
        refs = [
            actor.start.remote(
                engine_args,
                {
                    "rank": rank,
                    "local_rank": local_ranks[rank],
                    "tensor_parallel_size": s.tensor_parallel_size,
                    "pipeline_parallel_size": s.pipeline_parallel_size,
                    "init_method": init_method,
                },
                s.dist_timeout_s,
            )
            for rank, actor in enumerate(placed.actors)
        ]
        blocks = self._gather(refs, "start-up", s.startup_timeout_s)
        self.num_kv_blocks = min(int(b) for b in blocks)
        self._gather(
            [a.init_kv_cache.remote(self.num_kv_blocks) for a in placed.actors],
            "init_kv_cache",
            s.startup_timeout_s,
        )
        if s.node_local:
            self._attach_local(ray)
        if s.compiled_graph:
            placed.dag = self._compile(placed.actors)
        if placed.dag is not None:
            how = "a Ray compiled graph"
        elif self.local_ranks:
            how = f"the node-local shared-memory ring for rank(s) {self.local_ranks}"
            if self._remote_ranks():
                how += f", an actor call for rank(s) {self._remote_ranks()}"
        else:
            how = "one actor call per rank"
        logger.info(
            "ray executor: %d actors ready, %d KV blocks each (the minimum over ranks), "
            "steps by %s",
            s.world_size,
            self.num_kv_blocks,
            how,
        )

    def _attach_local(self, ray: Any) -> None:
        """Attach the ranks on the engine's node to the node-local data path (the ring,
        unless a compiled graph drives the steps; the result area for the driver). A
        rank that cannot attach (not really on this machine) leaves every rank on
        actor calls, with a warning; a rank that dies meanwhile fails the start."""
        s = self.settings
        placed = self._placed
        here = ray.get_runtime_context().get_node_id()
        ring = not s.compiled_graph
        ranks = [r for r, node in enumerate(self.node_ids) if node == here]
        if not ring:  # the graph carries the steps: only the driver's result area
            ranks = [r for r in ranks if r == s.driver_rank and s.result_area_bytes > 0]
        if not ranks:
            return
        try:
            placed.local = LocalRanks(
                ranks,
                s.driver_rank,
                ring=ring,
                result_bytes=s.result_area_bytes,
                result_slots=s.pipeline_parallel_size,
                ring_warning_interval_s=s.ring_warning_interval_s,
            )
        except OSError as exc:
            logger.warning(
                "ray executor: no node-local data path (%s); every rank gets its steps by "
                "actor calls",
                exc,
            )
            return
        local = placed.local
        refs = {r: placed.actors[r].attach_local.remote(local.offer(r)) for r in ranks}

        def check() -> None:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
            for ref in ready:
                ray.get(ref)  # raises what the attach raised

        try:
            local.accept(_ATTACH_TIMEOUT_S, check)
            ray.get(list(refs.values()), timeout=_ATTACH_TIMEOUT_S)
        except ray.exceptions.RayActorError as exc:
            ids = [actor._actor_id.hex() for actor in placed.actors]
            dead = getattr(exc, "actor_id", None)
            self._fail(ids.index(dead) if dead in ids else ranks[0], "attach_local", exc)
        except (
            OSError,
            MessageError,
            ray.exceptions.RayTaskError,
            ray.exceptions.GetTimeoutError,
        ) as exc:
            logger.warning(
                "ray executor: rank(s) %s on the engine's node could not attach to its "
                "shared memory (%s); every rank gets its steps by actor calls",
                ranks,
                _describe(ray, exc) if isinstance(exc, ray.exceptions.RayError) else exc,
            )
            placed.local = None
            local.close()
            detach = [placed.actors[r].detach_local.remote() for r in ranks]
            self._gather(detach, "detach_local", _ATTACH_TIMEOUT_S)
            return
        self.local_ranks = list(ranks) if ring else []
        if ring:
            placed.serve_refs = {r: placed.actors[r].serve_local.remote() for r in ranks}

    def _compile(self, actors: list[Any]) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as step:
            dag = MultiOutputNode([actor.execute.bind(step) for actor in actors])
        from ray.dag.context import DAGContext

        # one execution in flight per pipeline stage at least (Ray's default is 10)
        inflight = DAGContext.get_current().max_inflight_executions
        kwargs: dict[str, Any] = {
            "_max_inflight_executions": max(inflight, self.settings.pipeline_parallel_size)
        }
        if self.settings.overlap_gpu_communication:
            kwargs["_overlap_gpu_communication"] = True
        try:
            return dag.experimental_compile(**kwargs)
        except Exception as exc:
            raise WorkerStartError(
                "the ray executor could not start: VLLM_USE_RAY_COMPILED_DAG=1 but Ray could "
                f"not compile the step graph: {type(exc).__name__}: {exc}; unset the variable "
                "to drive the actors by plain calls"
            ) from exc

    # waiting ---------------------------------------------------------------------------
    def _graph_call(self, call: Callable[[], _T]) -> _T:
        """``call`` (a use of the compiled graph) with Ray's errors turned into the
        executor's death: Ray ends a wait when an actor dies (its ActorDiedError); a step
        that takes longer than :attr:`RaySettings.compiled_step_timeout_s` is taken as
        hung."""
        ray = self._ray
        try:
            return call()
        except ray.exceptions.RayChannelTimeoutError:
            self._die(
                "the compiled graph's step took over "
                f"{self.settings.compiled_step_timeout_s:g} s (RAY_CGRAPH_get_timeout)"
            )
        except ray.exceptions.RayActorError as exc:
            ids = [actor._actor_id.hex() for actor in self._placed.actors]
            dead = getattr(exc, "actor_id", None)
            if dead in ids:
                self._fail(ids.index(dead), "execute", exc)
            self._die(f"an actor died during execute: {_describe(ray, exc)}")
        except Exception as exc:
            self._die(f"the compiled graph failed during execute: {_describe(ray, exc)}")

    def _compiled_collect(self, refs: Any) -> tuple[list[Any], Reply | None]:
        """The oldest step through the compiled graph (``refs``: what its ``execute``
        returned): every rank's output and, when the driver rank is on the node-local
        path, the StepResult it sent on its connection."""
        ray = self._ray
        local = self._placed.local
        conn = local.conns.get(self.settings.driver_rank) if local is not None else None
        message: Reply | None = None

        def wait_step() -> list[Any]:
            nonlocal message
            if conn is not None:
                message = self._early.popleft() if self._early else self._await_driver(conn)
            return list(ray.get(refs, timeout=self.settings.compiled_step_timeout_s))

        replies = self._graph_call(wait_step)
        if isinstance(message, WorkerFailed):  # Ray had nothing to say: the rank's words
            self._die(f"worker rank {message.rank} failed during {message.phase}: {message.error}")
        return replies, message

    def _await_driver(self, conn: Connection) -> Reply | None:
        """The driver rank's reply on its connection, sleeping until it comes (bounded
        like the graph's own wait); None when the connection ended (the actor died:
        the graph's outputs say how)."""
        timeout = self.settings.compiled_step_timeout_s
        if not wait([conn], timeout=timeout):
            self._die(f"the compiled graph's step took over {timeout:g} s (RAY_CGRAPH_get_timeout)")
        try:
            return decode_reply(conn.recv_bytes())
        except (EOFError, OSError):
            return None
        except MessageError as exc:
            self._die(f"the driver rank sent a malformed reply during execute: {exc}")

    def _gather_ranks(
        self, refs: Mapping[int, Any], phase: str, timeout_s: float | None = None
    ) -> dict[int, Any]:
        """Every rank's value of its ref (``refs``: rank -> ref); the first failure ends
        the wait, a local rank's failure or death included."""
        ray = self._ray
        rank_of = {ref: rank for rank, ref in refs.items()}
        values: dict[int, Any] = {}
        pending = list(rank_of)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        watch_local = self._running and bool(self.local_ranks)
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                late = ", ".join(str(rank_of[r]) for r in pending)
                self._fail_start(f"worker rank(s) {late} did not finish {phase} in {timeout_s:g} s")
            if watch_local:
                left = _WATCH_S if left is None else min(left, _WATCH_S)
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                try:
                    values[rank_of[ref]] = ray.get(ref)
                except Exception as exc:
                    self._fail(rank_of[ref], phase, exc)
            if watch_local and not ready:
                self._poll_local(phase)
        return values

    def _await_local(self, kind: type[_R], ranks: Sequence[int], phase: str) -> dict[int, _R]:
        """One ``kind`` reply from each of the local ``ranks`` on their connections,
        watching every local rank's connection and, every half second, every Ray
        reference in flight (the remote ranks' calls, the local ranks' serve calls)."""
        local = self._placed.local
        assert local is not None
        pending = set(ranks)
        got: dict[int, _R] = {}
        by_conn = {conn: rank for rank, conn in local.conns.items()}
        while pending:
            ready = wait(list(by_conn), timeout=_WATCH_S)
            if not ready:
                self._check_refs(phase)
            for conn in ready:
                assert isinstance(conn, Connection)
                rank = by_conn[conn]
                message = self._receive_local(conn, rank, phase)
                if isinstance(message, kind) and rank in pending:
                    got[rank] = message
                    pending.discard(rank)
                else:
                    self._die(f"worker rank {rank} sent {type(message).__name__} during {phase}")
        return got

    def _poll_local(self, phase: str) -> None:
        """Raise (the executor dead) when a local rank has failed or died; else nothing."""
        local = self._placed.local
        if local is None:
            return
        for rank, conn in list(local.conns.items()):
            if not conn.closed and conn.poll(0):
                message = self._receive_local(conn, rank, phase)
                if (
                    rank == self.settings.driver_rank
                    and isinstance(message, StepResult)
                    and len(self._early) < len(self._in_flight)
                ):
                    self._early.append(message)  # a later step in flight finished first
                    continue
                self._die(f"worker rank {rank} sent {type(message).__name__} during {phase}")

    def _watched(self) -> dict[Any, int]:
        """Every Ray reference in flight that only ends when its actor fails or stops."""
        watched = {ref: rank for rank, ref in self._placed.serve_refs.items()}
        watched.update({ref: rank for rank, ref in self._remote.items()})
        for entry in self._in_flight:
            watched.update({ref: rank for rank, ref in entry.remote.items()})
        return watched

    def _check_refs(self, phase: str) -> None:
        """A failed remote call or a local rank's ended serve call makes the executor dead."""
        ray = self._ray
        watched = self._watched()
        if not watched:
            return
        ready, _ = ray.wait(list(watched), num_returns=len(watched), timeout=0)
        for ref in ready:
            rank = watched[ref]
            try:
                ray.get(ref)
            except Exception as exc:
                self._fail(rank, phase, exc)
            if rank in self._placed.serve_refs:
                self._die(f"worker rank {rank} stopped serving the ring during {phase}")

    def _receive_local(self, conn: Connection, rank: int, phase: str) -> Reply:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            self._local_died(rank, phase)
        try:
            message = decode_reply(payload)
        except MessageError as exc:
            self._die(f"worker rank {rank} sent a malformed reply during {phase}: {exc}")
        if isinstance(message, WorkerFailed):
            what = f"worker rank {rank} failed during {message.phase}: {message.error}"
            logger.error("%s\n%s", what, message.traceback.rstrip())
            dead = self._peer_death(rank, phase)
            if dead is not None:  # the root cause: a collective failed because a peer died
                what = f"{dead}; then {what.splitlines()[0][:300]}"
            self._die(what)
        return message

    def _local_died(self, rank: int, phase: str) -> NoReturn:
        """A local rank's connection closed: its process is gone. Ray's word on it when
        it comes within a few seconds (its serve call's ActorDiedError)."""
        ray = self._ray
        ref = self._placed.serve_refs.get(rank)
        if ref is not None:
            ready, _ = ray.wait([ref], timeout=5.0)
            if ready:
                try:
                    ray.get(ref)
                except Exception as exc:
                    self._fail(rank, phase, exc)
        pid = self.pids[rank] if rank < len(self.pids) else None
        self._die(
            f"worker rank {rank} (actor pid {pid}) died during {phase}: its connection to the "
            "engine closed"
        )

    def _peer_death(self, rank: int, phase: str, within_s: float = 1.0) -> str | None:
        """Another rank's actor found dead now or within ``within_s`` (described), the
        root cause when ``rank`` failed in a collective; None if none."""
        ray = self._ray
        watched = {ref: r for ref, r in self._watched().items() if r != rank}
        deadline = time.monotonic() + within_s
        while watched:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=left)
            for ref in ready:
                peer = watched.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    pid = self.pids[peer] if peer < len(self.pids) else None
                    return (
                        f"worker rank {peer} (actor pid {pid}) died during {phase}: "
                        f"{_describe(ray, exc)}"
                    )
                except Exception:
                    continue
        return None

    def _gather(self, refs: list[Any], phase: str, timeout_s: float | None) -> list[Any]:
        """Every ref's value (refs[i] from rank i); the first failure ends the wait."""
        ray = self._ray
        ranks = {ref: rank for rank, ref in enumerate(refs)}
        values: dict[int, Any] = {}
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                late = ", ".join(str(ranks[r]) for r in pending)
                self._fail_start(f"worker rank(s) {late} did not finish {phase} in {timeout_s:g} s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                try:
                    values[ranks[ref]] = ray.get(ref)
                except Exception as exc:
                    self._fail(ranks[ref], phase, exc)
        return [values[i] for i in range(len(refs))]

    def _fail(self, rank: int, phase: str, exc: BaseException) -> NoReturn:
        ray = self._ray
        pid = self.pids[rank] if rank < len(self.pids) else None
        who = f"worker rank {rank}" + (f" (actor pid {pid})" if pid is not None else "")
        if isinstance(exc, ray.exceptions.RayActorError):
            what = f"{who} died during {phase}: {_describe(ray, exc)}"
        else:
            what = f"{who} failed during {phase}: {_describe(ray, exc)}"
        if self._running:
            self._die(what)
        cause = getattr(exc, "cause", None)
        self._fail_start(what, user_error=isinstance(cause, KvrunError) or "died" not in what)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)

    def _fail_start(self, what: str, *, user_error: bool = True) -> NoReturn:
        self._placed.kill_actors()
        if user_error:
            raise WorkerStartError(f"the ray executor could not start: {what}")
        raise ExecutorDeadError(f"the ray executor could not start: {what}")

    def _die(self, what: str) -> NoReturn:
        """Record the failure, kill every actor, remove the group, raise."""
        self._dead = f"the engine is dead: {what}"
        logger.error("ray executor: %s; killing every actor", what)
        self._placed.kill_actors()
        raise ExecutorDeadError(self._dead)


def _attached(ref: SharedTensor | AttachedTensor, arrays: Sequence[Any]) -> torch.Tensor:
    """A writable copy of the array ``ref`` names (the sampler edits logits in place; what
    Ray returns is read-only and, under a compiled graph, reused by the next step)."""
    if not isinstance(ref, AttachedTensor) or not 0 <= ref.index < len(arrays):
        raise MessageError(f"the reply names {ref}, and {len(arrays)} array(s) came with it")
    tensor = torch.tensor(arrays[ref.index])
    if tensor.dtype != dtype_named(ref.dtype) or list(tensor.shape) != ref.shape:
        raise MessageError(
            f"array {ref.index} is {tensor.dtype} {list(tensor.shape)}; the reply says "
            f"{ref.dtype} {ref.shape}"
        )
    return tensor


def _describe(ray: Any, exc: BaseException) -> str:
    """One line: the original exception of a failed actor call, or Ray's own error."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"
