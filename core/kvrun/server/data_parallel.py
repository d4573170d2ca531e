"""Data parallelism: N whole engine cores behind one frontend (`kvrun serve -dp N`).

Each rank is a complete engine (its own model copy, scheduler and KV cache) in its
own process. Rank 0's ``kvrun serve`` runs the frontend and the ranks local to it
(spawned, over ipc:// as with one engine); ranks on other machines are `kvrun serve
--headless` processes that connect to the master address over tcp (see
:mod:`kvrun.server.dp_remote`). :class:`DataParallelTransport` makes all of them one
:class:`~kvrun.server.transport.Transport` to the :class:`EngineClient`:

- a new request goes to the rank :class:`Balancer` picks (load first, prefix-cache
  locality where it is known); aborts go to the rank that owns the request;
- utility calls (reset_prefix_cache, LoRA load/unload, profiling), and Shutdown go to
  every rank, and a utility call's answer is the merge of every rank's;
- the frontend sees one Hello and one Ready (when every rank is ready), and Outputs
  whose stats are the sum over ranks; each rank's own stats stay in ``stats_by_rank``
  for /metrics (label ``engine``);
- any rank exiting, failing or falling silent is the whole engine's death: the
  EngineClient's fault handling then kills and reaps every rank.

Invariant: every request id in ``_owner`` is unfinished on exactly that rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kvrun.errors import ConfigError
from kvrun.scheduling.output import SchedulerStats
from kvrun.server.transport import ProcessTransport, Transport
from kvrun.server.wire import (
    Abort,
    AddRequest,
    Dead,
    EngineMessage,
    FrontendMessage,
    Hello,
    Outputs,
    Ready,
    Shutdown,
    Utility,
    UtilityResult,
)
from kvrun.stats import EngineStats

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot
    from kvrun.server.dp_remote import RemoteRanks

__all__ = [
    "DEFAULT_MASTER_IP",
    "DEFAULT_MASTER_PORT",
    "LOCALITY_SLACK",
    "Balancer",
    "DataParallelConfig",
    "DataParallelTransport",
    "core_cpus",
    "merge_stats",
    "resolve_data_parallel",
]

logger = logging.getLogger(__name__)

DEFAULT_MASTER_IP = "127.0.0.1"
DEFAULT_MASTER_PORT = 29550  # vLLM's --data-parallel-rpc-port default
# A request goes to the rank that last got its prompt's first block (or adapter) unless
# that rank has more than this many unfinished requests above the least loaded one.
LOCALITY_SLACK = 4
_LOCALITY_MEMORY = 4096  # first-block keys remembered (least recently used dropped)


@dataclass(frozen=True)
class DataParallelConfig:
    """Where this process stands in a data-parallel deployment (resolved once)."""

    size: int = 1  # ranks in all
    start_rank: int = 0  # the first rank this process runs (0: it runs the frontend)
    local_size: int = 1  # ranks this process runs
    master_ip: str = DEFAULT_MASTER_IP  # rank 0 listens here for remote ranks
    master_port: int = DEFAULT_MASTER_PORT
    headless: bool = False  # no frontend: engine core(s) that connect to the master
    threads_per_core: int | None = None  # None: as OMP_NUM_THREADS/VLLM_CPU_OMP_THREADS_BIND

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def remote_ranks(self) -> range:
        """The ranks rank 0 waits for over tcp (none when every rank is local)."""
        return range(self.local_size, self.size) if not self.headless else range(0)

    @property
    def master(self) -> str:
        host = f"[{self.master_ip}]" if ":" in self.master_ip else self.master_ip
        return f"{host}:{self.master_port}"


def _given(args: Any, name: str) -> Any:
    return getattr(args, name, None)


def resolve_data_parallel(args: Any, env: EnvSnapshot) -> DataParallelConfig:
    """The DP settings from `kvrun serve`'s flags and VLLM_DP_*; ConfigError naming the
    flag or variable at fault. A flag and its variable must agree when both are given."""
    size_flag = _given(args, "data_parallel_size_arg")
    size_env = env.VLLM_DP_SIZE if env.raw("VLLM_DP_SIZE") is not None else None
    if size_flag is not None and size_env is not None and size_flag != size_env:
        raise ConfigError(
            f"--data-parallel-size {size_flag} and VLLM_DP_SIZE={size_env} disagree; "
            "give the same data-parallel size to both, or only one of them"
        )
    size = size_flag if size_flag is not None else (size_env or 1)
    if size < 1:
        raise ConfigError(f"--data-parallel-size must be >= 1, got {size}")
    rank_flag = _given(args, "data_parallel_start_rank")
    rank_env = env.VLLM_DP_RANK if env.raw("VLLM_DP_RANK") is not None else None
    if rank_flag is not None and rank_env is not None and rank_flag != rank_env:
        raise ConfigError(
            f"--data-parallel-start-rank {rank_flag} and VLLM_DP_RANK={rank_env} disagree; give one"
        )
    rank = rank_flag if rank_flag is not None else (rank_env or 0)
    if not 0 <= rank < size:
        source = "--data-parallel-start-rank" if rank_flag is not None else "VLLM_DP_RANK"
        raise ConfigError(
            f"{source}={rank} is outside the data-parallel ranks 0..{size - 1} "
            f"(data-parallel size {size}); accepted: 0 <= rank < size"
        )
    headless = bool(_given(args, "headless")) or rank > 0
    if headless and rank == 0:
        raise ConfigError(
            "--headless runs engine cores for ranks >= 1 (rank 0 runs the frontend); give "
            "--data-parallel-start-rank R (or VLLM_DP_RANK=R) with 1 <= R < "
            "--data-parallel-size"
        )
    external = headless or rank_flag is not None or rank_env is not None
    local_flag = _given(args, "data_parallel_size_local")
    local = local_flag if local_flag is not None else (1 if external else size)
    if headless and local != 1:
        raise ConfigError(
            f"--data-parallel-size-local {local} with --headless: a headless process runs "
            "one rank; start one `kvrun serve --headless` per rank"
        )
    if not 1 <= local <= size:
        raise ConfigError(
            f"--data-parallel-size-local must be in 1..{size} (the data-parallel size), got {local}"
        )
    ip_flag = _given(args, "data_parallel_address")
    ip_source = "--data-parallel-address" if ip_flag is not None else "VLLM_DP_MASTER_IP"
    ip = ip_flag if ip_flag is not None else (env.VLLM_DP_MASTER_IP or DEFAULT_MASTER_IP)
    try:
        ip = str(ipaddress.ip_address(ip.strip().strip("[]")))
    except ValueError:
        raise ConfigError(
            f"{ip_source}={ip!r} is not an IP address; accepted: the IPv4 or IPv6 address "
            "of rank 0's machine (the master listens on exactly that address), e.g. "
            f"{DEFAULT_MASTER_IP}"
        ) from None
    port_flag = _given(args, "data_parallel_rpc_port")
    port = port_flag if port_flag is not None else (env.VLLM_DP_MASTER_PORT or DEFAULT_MASTER_PORT)
    if not 1 <= port <= 65535:
        source = "--data-parallel-rpc-port" if port_flag is not None else "VLLM_DP_MASTER_PORT"
        raise ConfigError(f"{source}={port} is not a port; accepted: 1..65535")
    if size > 1 and not env.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise ConfigError(
            "data parallelism runs each rank in its own engine process; it cannot run with "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 (unset it)"
        )
    return DataParallelConfig(
        size=size,
        start_rank=rank,
        local_size=local,
        master_ip=ip,
        master_port=port,
        headless=headless,
    )


def core_cpus(local_size: int, env: EnvSnapshot) -> list[tuple[int, ...] | None]:
    """The CPUs each local rank's engine process is pinned to (its thread count): this
    process's CPUs split evenly, one share per rank. None for every rank when the user
    set the threads (OMP_NUM_THREADS, or VLLM_CPU_OMP_THREADS_BIND other than 'all')."""
    if os.environ.get("OMP_NUM_THREADS") or env.VLLM_CPU_OMP_THREADS_BIND.strip() != "all":
        return [None] * local_size
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // local_size)
    out: list[tuple[int, ...] | None] = []
    for rank in range(local_size):
        start = (rank * share) % len(cpus)
        out.append(tuple(cpus[start : start + share]))
    return out


def merge_stats(ranks: Sequence[EngineStats]) -> EngineStats:
    """The stats of all ranks as one engine's: counts summed, KV usage over all blocks."""
    sched = [s.scheduler for s in ranks]
    blocks = sum(s.num_blocks for s in sched)
    used = sum(s.kv_cache_usage * s.num_blocks for s in sched)
    summed = {
        f.name: sum(getattr(s, f.name) for s in sched)
        for f in dataclasses.fields(SchedulerStats)
        if f.name != "kv_cache_usage"
    }
    return EngineStats(
        scheduler=SchedulerStats(kv_cache_usage=used / blocks if blocks else 0.0, **summed),
        prompt_tokens_total=sum(s.prompt_tokens_total for s in ranks),
        generation_tokens_total=sum(s.generation_tokens_total for s in ranks),
    )


class Balancer:
    """Chooses the rank for each new request.

    The rule: the least loaded rank is the one with the fewest unfinished requests
    (counted here, exact), ties broken by the waiting queue its latest stats report,
    then by the rank chosen longest ago. A request whose locality key (its LoRA adapter
    and its prompt's first full KV block) was last sent to rank H goes to H unless H has
    more than ``slack`` unfinished requests above the least loaded rank; otherwise it
    goes to the least loaded rank, which becomes the key's home. Prompts shorter than a
    block have no key (nothing of theirs can be cached).
    """

    def __init__(self, size: int, *, slack: int = LOCALITY_SLACK) -> None:
        self.size = size
        self.slack = slack
        self.block_size = 0  # set when the engines are ready; 0: no locality
        self.unfinished = [0] * size
        self.waiting = [0] * size
        self._last_chosen = [r - size for r in range(size)]  # rank 0 first at start
        self._tick = 0
        self._homes: OrderedDict[bytes, int] = OrderedDict()

    def locality_key(self, prompt_token_ids: Sequence[int], lora_name: str | None) -> bytes | None:
        if self.block_size <= 0 or len(prompt_token_ids) < self.block_size:
            return None
        digest = hashlib.sha256((lora_name or "").encode())
        digest.update(b"\0" + ",".join(map(str, prompt_token_ids[: self.block_size])).encode())
        return digest.digest()

    def least_loaded(self) -> int:
        return min(
            range(self.size),
            key=lambda r: (self.unfinished[r], self.waiting[r], self._last_chosen[r]),
        )

    def choose(self, prompt_token_ids: Sequence[int], lora_name: str | None = None) -> int:
        """The rank for a new request (counted as unfinished there)."""
        least = self.least_loaded()
        chosen = least
        key = self.locality_key(prompt_token_ids, lora_name)
        if key is not None:
            home = self._homes.get(key)
            if home is not None and self.unfinished[home] - self.unfinished[least] <= self.slack:
                chosen = home
            self._homes[key] = chosen
            self._homes.move_to_end(key)
            while len(self._homes) > _LOCALITY_MEMORY:
                self._homes.popitem(last=False)
        self._tick += 1
        self._last_chosen[chosen] = self._tick
        self.unfinished[chosen] += 1
        return chosen

    def finished(self, rank: int) -> None:
        self.unfinished[rank] = max(0, self.unfinished[rank] - 1)


@dataclass
class _PendingCall:
    waiting_for: set[int]
    results: dict[int, UtilityResult]


class DataParallelTransport(Transport):
    """Every rank of a data-parallel deployment as one transport (see the module doc)."""

    def __init__(self, engine_args: EngineArgs, env: EnvSnapshot, dp: DataParallelConfig) -> None:
        self.dp = dp
        self._env = env
        self.size = dp.size
        core_args = replace(engine_args, data_parallel_size=1)  # each rank: a whole engine
        self._cpus = core_cpus(dp.local_size, env)
        self._local: dict[int, ProcessTransport] = {}
        self._remote: RemoteRanks | None = None
        try:
            if dp.remote_ranks:
                from kvrun.server.dp_remote import RemoteRanks

                self._remote = RemoteRanks(dp, env)
            for rank in range(dp.local_size):
                self._local[rank] = ProcessTransport(
                    core_args, env, rank=rank, cpus=self._cpus[rank]
                )
        except BaseException:
            self._release_sockets()
            raise
        self.balancer = Balancer(dp.size)
        self.stats_by_rank: dict[int, EngineStats] = {}
        self._queue: asyncio.Queue[tuple[int, EngineMessage]] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._owner: dict[str, int] = {}
        self._ready: dict[int, Ready] = {}
        self._said_hello = False
        self._all_ready = False
        self._calls: dict[int, _PendingCall] = {}
        self._last_heard = [time.monotonic()] * dp.size
        self._register_deadline = 0.0
        self._closed = False

    # life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        for rank, transport in self._local.items():
            cpus = self._cpus[rank]
            await transport.start()
            logger.info(
                "DP rank %d: engine core with %s",
                rank,
                f"{len(cpus)} thread(s) on CPU(s) {','.join(map(str, cpus))}"
                if cpus is not None
                else "the threads OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND set",
            )
            self._pumps.append(asyncio.create_task(self._pump(rank, transport)))
        if self._remote is not None:
            self._register_deadline = time.monotonic() + self._remote.register_timeout_s
            self._pumps.append(asyncio.create_task(self._remote.pump(self._queue)))
            logger.info(
                "DP master listening on %s for rank(s) %s",
                self.dp.master,
                ", ".join(map(str, self.dp.remote_ranks)),
            )

    async def _pump(self, rank: int, transport: ProcessTransport) -> None:
        while True:
            for msg in await transport.receive():
                self._queue.put_nowait((rank, msg))

    # frontend -> ranks ---------------------------------------------------------------
    def _send_to(self, rank: int, msg: FrontendMessage) -> None:
        local = self._local.get(rank)
        if local is not None:
            local.send(msg)
        elif self._remote is not None:
            self._remote.send(rank, msg)

    def send(self, msg: FrontendMessage) -> None:
        if isinstance(msg, AddRequest):
            # media: no locality key (the prompt's tokens do not say what the media is)
            media = getattr(msg, "multi_modal_data", None) is not None
            rank = self.balancer.choose([] if media else msg.prompt_token_ids, msg.lora_name)
            self._owner[msg.request_id] = rank
            self._send_to(rank, msg)
        elif isinstance(msg, Abort):
            by_rank: dict[int, list[str]] = {}
            for request_id in msg.request_ids:
                owner = self._owner.pop(request_id, None)
                if owner is not None:
                    self.balancer.finished(owner)
                    by_rank.setdefault(owner, []).append(request_id)
            for rank, ids in by_rank.items():
                self._send_to(rank, Abort(ids))
        elif isinstance(msg, Utility):
            self._calls[msg.call_id] = _PendingCall(set(range(self.size)), {})
            for rank in range(self.size):
                self._send_to(rank, msg)
        else:
            assert isinstance(msg, Shutdown)
            for rank in range(self.size):
                self._send_to(rank, msg)

    def engine_index(self, request_id: str) -> int:
        return self._owner.get(request_id, 0)

    # ranks -> frontend ---------------------------------------------------------------
    async def receive(self) -> list[EngineMessage]:
        messages: list[EngineMessage] = []
        while not messages:
            rank, msg = await self._queue.get()
            while True:
                out = self._take(rank, msg)
                if out is not None:
                    messages.append(out)
                try:
                    rank, msg = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
        return messages

    def _take(self, rank: int, msg: EngineMessage) -> EngineMessage | None:
        """What one rank's message means to the frontend (None: nothing yet)."""
        self._last_heard[rank] = time.monotonic()
        if isinstance(msg, Outputs):
            self.stats_by_rank[rank] = msg.stats
            self.balancer.waiting[rank] = msg.stats.scheduler.num_waiting
            for delta in msg.deltas:
                if delta.finished and self._owner.pop(delta.request_id, None) is not None:
                    self.balancer.finished(rank)
            for rejected in msg.rejected:
                if self._owner.pop(rejected.request_id, None) is not None:
                    self.balancer.finished(rank)
            merged = merge_stats([self.stats_by_rank[r] for r in sorted(self.stats_by_rank)])
            return Outputs(msg.deltas, msg.rejected, merged, msg.sent_at)
        if isinstance(msg, UtilityResult):
            return self._merge_result(rank, msg)
        if isinstance(msg, Dead):
            return Dead(f"DP rank {rank}: {msg.message}", msg.user_error)
        if isinstance(msg, Hello):
            if self._said_hello:
                return None
            self._said_hello = True
            return msg
        if isinstance(msg, Ready):
            return self._rank_ready(rank, msg)
        return None

    def _rank_ready(self, rank: int, msg: Ready) -> EngineMessage | None:
        self._ready[rank] = msg
        logger.info("DP rank %d ready (%d of %d)", rank, len(self._ready), self.size)
        first = self._ready[min(self._ready)].info
        info = msg.info
        for name in ("model_name", "model_path", "vocab_size", "max_model_len", "block_size"):
            if getattr(info, name) != getattr(first, name):
                return Dead(
                    f"DP rank {rank} loaded another engine than rank {min(self._ready)}: "
                    f"{name} {getattr(info, name)!r} != {getattr(first, name)!r}; start "
                    "every rank with the same model and engine flags",
                    user_error=True,
                )
        if len(self._ready) < self.size:
            return None
        self._all_ready = True
        self.balancer.block_size = first.block_size
        now = time.monotonic()
        self._last_heard = [now] * self.size
        return self._ready[0]  # what one rank holds: each request runs on one rank

    def _merge_result(self, rank: int, msg: UtilityResult) -> UtilityResult | None:
        call = self._calls.get(msg.call_id)
        if call is None:
            return None
        call.waiting_for.discard(rank)
        call.results[rank] = msg
        if call.waiting_for:
            return None
        del self._calls[msg.call_id]
        failed = [(r, res) for r, res in sorted(call.results.items()) if not res.ok]
        if failed:
            r, first = failed[0]
            error = first.error if first.status < 500 else f"DP rank {r}: {first.error}"
            return UtilityResult(msg.call_id, False, None, error, first.status)
        values = [res.value for res in call.results.values()]
        value = None if all(v is None for v in values) else all(bool(v) for v in values)
        return UtilityResult(msg.call_id, True, value, None)

    def pending(self) -> bool:
        # Only the queue the pumps fill: asking a rank's socket (ZMQ_EVENTS) would consume
        # the edge its pump's reader waits for, and that rank's messages would stall for
        # good (seen under load: the engine blocked in send, the frontend idle). The
        # pumps drain every socket as messages arrive, so the queue says enough.
        return not self._queue.empty()

    def exit_reason(self) -> str | None:
        for rank, transport in self._local.items():
            reason = transport.exit_reason()
            if reason is not None:
                return f"DP rank {rank}: {reason}"
        silent = self._silent_rank()
        if silent is not None:
            return silent
        if self._remote is None or self._all_ready or not self._register_deadline:
            return None
        missing = [r for r in self.dp.remote_ranks if not self._remote.registered(r)]
        if missing and time.monotonic() > self._register_deadline:
            return (
                f"DP rank(s) {', '.join(map(str, missing))} did not register with the "
                f"master at {self.dp.master} within {self._remote.register_timeout_s:.0f} s; "
                "start them with the same data-parallel size, VLLM_DP_MASTER_IP "
                "(--data-parallel-address) and VLLM_DP_MASTER_PORT (--data-parallel-rpc-port)"
            )
        return None

    def _silent_rank(self) -> str | None:
        """A rank that stopped heartbeating while the others go on (the EngineClient's
        own watchdog sees only that *some* rank speaks)."""
        if not self._all_ready or self.pending():
            return None
        timeout = float(self._env.VLLM_ENGINE_ITERATION_TIMEOUT_S)
        now = time.monotonic()
        for rank in range(self.size):
            silent = now - self._last_heard[rank]
            if silent > timeout:
                return (
                    f"DP rank {rank} has not answered for {silent:.1f} s, over "
                    f"VLLM_ENGINE_ITERATION_TIMEOUT_S={self._env.VLLM_ENGINE_ITERATION_TIMEOUT_S}"
                )
        return None

    def kill(self) -> None:
        """Stop every rank now (one died or hung) and reap the local ones in the
        background, so none lingers while a kept-alive server answers 503."""
        for transport in self._local.values():
            transport.kill()
        if self._remote is not None:
            self._remote.stop_all()
        with contextlib.suppress(RuntimeError):  # no running loop: close() reaps
            self._pumps.append(asyncio.get_running_loop().create_task(self._reap()))

    async def _reap(self) -> None:
        processes = [t.process for t in self._local.values() if t.process is not None]
        await asyncio.gather(*(asyncio.to_thread(p.join, 10.0) for p in processes))
        # their sockets and files go in close(), after the frontend stops sending

    async def close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._pumps:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(t.close(timeout) for t in self._local.values()))
        self._release_sockets()

    def _release_sockets(self) -> None:
        if self._remote is not None:
            self._remote.close()
        for transport in self._local.values():
            transport.release()
