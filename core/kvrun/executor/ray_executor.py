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
  (tp_rank 0 of the last stage) answers a :class:`~kvrun.executor.messages.StepResult`
  with its float32 logits beside it as numpy arrays (one copy out of Ray's object store).
  By default each step is one actor call per rank; under VLLM_USE_RAY_COMPILED_DAG=1
  the calls go through a Ray compiled graph (InputNode -> every actor's ``execute`` ->
  MultiOutputNode), over Ray's shared-memory channels on cpu, where every rank must be
  on the engine's node (across nodes Ray 2.60's channels hung: refused, with the reason);
- faults: an actor that dies or raises makes the executor dead
  (:class:`~kvrun.executor.mp.ExecutorDeadError`, here and on every later call): the
  other actors are killed and the placement group removed before it raises. The waits
  watch every rank's reply, so a dead actor (Ray's ActorDiedError) ends them at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import torch

from kvrun.config import EngineArgs
from kvrun.engine.batch import StepLogits
from kvrun.errors import ConfigError, KvrunError
from kvrun.executor.messages import (
    AttachedTensor,
    ExecuteStep,
    MessageError,
    SharedTensor,
    StepResult,
    chunk_to_wire,
    decode_reply,
    dtype_named,
    encode,
    unpack_step_logits,
)
from kvrun.executor.mp import ExecutorDeadError, WorkerStartError
from kvrun.scheduling.output import ScheduledChunk

__all__ = [
    "RayExecutor",
    "RaySettings",
    "bundle_indices",
    "import_ray",
]

logger = logging.getLogger(__name__)


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
        self.released = False

    def kill_actors(self, teardown_first: bool = False) -> None:
        """Kill every actor, tear the graph down, remove the placement group (idempotent).
        ``teardown_first``: stop the graph's loops before the kill (a clean close; after
        a death the teardown would wait for the dead actor's loop)."""
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
    kwargs: dict[str, Any] = {"num_cpus": cpus, "include_dashboard": False}
    if settings.node_ip is not None:
        kwargs["_node_ip_address"] = settings.node_ip
    ray.init(**kwargs)
    placed.started_ray = placed.started_cluster = True


class RayExecutor:
    """A :class:`~kvrun.engine.step_runner.StepRunner` over Ray actors."""

    returns_hidden_states = True

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
        self._step = 0
        self._dead: str | None = None
        self._running = False
        self._placed = _Placed(ray)
        self._finalizer = weakref.finalize(self, self._placed.release)
        self.pids: list[int] = []  # each rank's actor process
        self.node_ids: list[str] = []  # each rank's Ray node
        self.node_ips: list[str] = []
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
        self._check_alive()
        step = self._step
        self._step += 1
        wire = [chunk_to_wire(c) for c in chunks]
        payload = encode(ExecuteStep(step, wire, prompt_logits_for, hidden_for))
        if self._placed.dag is not None:
            replies = self._compiled_step(payload)
        else:
            refs = [actor.execute.remote(payload) for actor in self._placed.actors]
            replies = self._gather(refs, "execute", None)
        reply = replies[self.settings.driver_rank]
        if not (isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], bytes)):
            self._die(f"the driver rank answered {type(reply).__name__} to step {step}")
        header, arrays = reply
        try:
            message = decode_reply(header)
            if not isinstance(message, StepResult) or message.step != step:
                self._die(f"the driver rank answered {type(message).__name__} to step {step}")
            return unpack_step_logits(message.logits, lambda ref: _attached(ref, arrays))
        except MessageError as exc:
            self._die(f"the driver rank's step result is malformed: {exc}")

    def commit_kv_cache(self) -> int:
        self._check_alive()
        refs = [actor.commit_kv_cache.remote() for actor in self._placed.actors]
        return sum(int(n) for n in self._gather(refs, "commit_kv_cache", None))

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
        if s.compiled_graph:
            placed.dag = self._compile(placed.actors)
        logger.info(
            "ray executor: %d actors ready, %d KV blocks each (the minimum over ranks), "
            "steps by %s",
            s.world_size,
            self.num_kv_blocks,
            "a Ray compiled graph" if placed.dag is not None else "one actor call per rank",
        )

    def _compile(self, actors: list[Any]) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as step:
            dag = MultiOutputNode([actor.execute.bind(step) for actor in actors])
        kwargs: dict[str, Any] = {}
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
    def _compiled_step(self, payload: bytes) -> list[bytes]:
        """One step through the compiled graph. Ray ends the wait when an actor dies
        (its ActorDiedError); a step that takes longer than
        :attr:`RaySettings.compiled_step_timeout_s` is taken as hung."""
        ray = self._ray
        try:
            refs = self._placed.dag.execute(payload)
            return list(ray.get(refs, timeout=self.settings.compiled_step_timeout_s))
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
