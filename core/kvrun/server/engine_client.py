"""The frontend's handle on the engine: submit requests, stream their outputs, watch health.

One task receives the engine's messages and fans each request's deltas out to that
request's queue, so many HTTP requests share one engine loop (continuous batching
across HTTP requests). A second task watches for the engine dying: its process
exiting, a Dead message, or no message for VLLM_ENGINE_ITERATION_TIMEOUT_S while
the engine should be heartbeating. Then every in-flight request fails with
:class:`EngineDeadError` and ``on_dead`` is called once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvrun.errors import KvrunError
from kvrun.server.errors import ApiError, EngineDeadError
from kvrun.server.metrics import RequestTimes, ServerMetrics
from kvrun.server.transport import ProcessTransport, ThreadTransport, Transport
from kvrun.server.wire import (
    Abort,
    AddRequest,
    CompletionDelta,
    Dead,
    EngineInfo,
    Hello,
    Outputs,
    Ready,
    RequestDelta,
    Shutdown,
    Utility,
    UtilityMethod,
    UtilityResult,
    WireLora,
    WireMultiModal,
    WirePooling,
    WireSampling,
)
from kvrun.stats import EngineStats

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot
    from kvrun.server.data_parallel import DataParallelConfig

__all__ = ["EngineClient", "RequestStream"]

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 0.1
_EXIT_GRACE_S = 1.0


class RequestStream:
    """The deltas of one request, in order, read with :meth:`get` until ``done``."""

    def __init__(self, request_id: str, times: RequestTimes, n: int = 1) -> None:
        self.request_id = request_id
        self.times = times
        self.n = n  # the request's sequences
        self.done = False  # the finished delta has been read
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._finished: set[int] = set()  # sequences whose finish was put
        self._cached_tokens = 0

    def put(self, item: RequestDelta | BaseException) -> None:
        if isinstance(item, RequestDelta):
            self._finished.update(c.index for c in item.completions if c.finish_reason)
            self._cached_tokens = item.num_cached_tokens
        self._queue.put_nowait(item)

    def abort_delta(self) -> RequestDelta:
        """The last delta of a request ended by the server: the sequences still running
        finish with finish_reason "abort" (what vLLM's clients see)."""
        return RequestDelta(
            request_id=self.request_id,
            completions=[
                CompletionDelta(i, "", [], None, None, "abort", None)
                for i in range(self.n)
                if i not in self._finished
            ],
            finished=True,
            num_cached_tokens=self._cached_tokens,
        )

    async def get(self) -> RequestDelta:
        """The next delta; raises ApiError (refused) or EngineDeadError."""
        assert not self.done, f"{self.request_id} already finished"
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item


class EngineClient:
    """Owns the transport; all methods run on the server's event loop."""

    def __init__(
        self,
        engine_args: EngineArgs,
        env: EnvSnapshot,
        *,
        on_dead: Callable[[str], None] | None = None,
        data_parallel: DataParallelConfig | None = None,  # N engine cores (-dp N)
    ) -> None:
        self.engine_args = engine_args
        self.env = env
        self.on_dead = on_dead
        self.transport: Transport
        if data_parallel is not None and data_parallel.enabled:
            from kvrun.server.data_parallel import DataParallelTransport

            self.transport = DataParallelTransport(engine_args, env, data_parallel)
        elif env.VLLM_ENABLE_V1_MULTIPROCESSING:
            self.transport = ProcessTransport(engine_args, env)
        else:
            self.transport = ThreadTransport(engine_args, env)
        self.info: EngineInfo | None = None
        self.stats: EngineStats | None = None
        self.metrics: ServerMetrics | None = None
        self.dead_reason: str | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[UtilityResult]] = {}
        self._call_ids = itertools.count()
        self._last_heard = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def dead_summary(self) -> str | None:
        """One line for clients: the reason's first line and, for a traceback, its last."""
        if self.dead_reason is None:
            return None
        lines = [line for line in self.dead_reason.splitlines() if line.strip()]
        if len(lines) <= 1:
            return self.dead_reason
        return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"

    def engine_stats(self) -> dict[int, EngineStats]:
        """Each engine's (data-parallel rank's) latest stats, by rank."""
        from kvrun.server.data_parallel import DataParallelTransport

        if isinstance(self.transport, DataParallelTransport):
            return dict(self.transport.stats_by_rank)
        return {} if self.stats is None else {0: self.stats}

    @property
    def rpc_timeout_s(self) -> float:
        return self.env.VLLM_RPC_TIMEOUT / 1000.0

    # life cycle ---------------------------------------------------------------------
    async def start(self) -> EngineInfo:
        """Start the engine and wait until its model is loaded; KvrunError if it cannot.

        The engine must say hello within VLLM_RPC_TIMEOUT; loading the model after
        that has no time bound beyond the engine staying alive.
        """
        await self.transport.start()
        hello_deadline = time.monotonic() + self.rpc_timeout_s
        said_hello = False
        while True:
            receive = asyncio.ensure_future(self.transport.receive())
            while not receive.done():
                await asyncio.wait({receive}, timeout=_WATCH_INTERVAL_S)
                if receive.done():
                    break
                reason = self.transport.exit_reason()
                if reason is not None:
                    # its last message (why it stopped) may still be in flight
                    await asyncio.wait({receive}, timeout=_EXIT_GRACE_S)
                    if receive.done():
                        break
                late = not said_hello and time.monotonic() > hello_deadline
                if reason is not None or late:
                    receive.cancel()
                    raise KvrunError(
                        f"{reason} while starting"
                        if reason is not None
                        else "the engine did not start within VLLM_RPC_TIMEOUT="
                        f"{self.env.VLLM_RPC_TIMEOUT} ms; raise it on a slow or loaded machine"
                    )
            for msg in receive.result():
                if isinstance(msg, Hello):
                    said_hello = True
                elif isinstance(msg, Dead):
                    if msg.user_error:
                        raise KvrunError(msg.message)
                    raise KvrunError(f"the engine failed to start:\n{msg.message}")
                elif isinstance(msg, Ready):
                    return self._started(msg.info)

    def _started(self, info: EngineInfo) -> EngineInfo:
        self.info = info
        self._last_heard = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="kvrun-engine-outputs"),
            asyncio.create_task(self._watchdog(), name="kvrun-engine-watchdog"),
        ]
        return info

    async def shutdown(self, timeout: float) -> None:
        """Stop the engine (gracefully, then by force) and release its sockets."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self.transport.exit_reason() is None and self.dead_reason is None:
            self.transport.send(Shutdown())
        await self.transport.close(timeout)

    # requests -----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: WireSampling,
        lora_name: str | None = None,  # a loaded LoRA adapter's name
        multi_modal_data: WireMultiModal | None = None,  # the prompt's decoded media
    ) -> RequestStream:
        if self.dead_summary is not None:
            raise EngineDeadError(self.dead_summary)
        n = params.n if isinstance(params.n, int) else 1
        stream = RequestStream(request_id, RequestTimes(arrival=time.monotonic()), n)
        self._streams[request_id] = stream
        self.transport.send(
            AddRequest(
                request_id,
                prompt_token_ids,
                params,
                stream.times.arrival,
                lora_name=lora_name,
                multi_modal_data=multi_modal_data,
            )
        )
        stream.times.engine = self.transport.engine_index(request_id)
        return stream

    def add_pooling_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        pooling: WirePooling,
        lora_name: str | None = None,  # a loaded LoRA adapter's name
    ) -> RequestStream:
        """A pooling request: its one (finished) delta carries ``pooled``."""
        if self.dead_summary is not None:
            raise EngineDeadError(self.dead_summary)
        stream = RequestStream(request_id, RequestTimes(arrival=time.monotonic()), 0)
        self._streams[request_id] = stream
        self.transport.send(
            AddRequest(
                request_id,
                prompt_token_ids,
                WireSampling(),
                stream.times.arrival,
                pooling,
                lora_name=lora_name,
            )
        )
        stream.times.engine = self.transport.engine_index(request_id)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort unfinished requests (a client went away); their KV blocks are freed."""
        live = [r for r in request_ids if self._streams.pop(r, None) is not None]
        if live and self.dead_reason is None:
            logger.info("aborting %s", ", ".join(live))
            self.transport.send(Abort(live))

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def abort_all(self) -> int:
        """End every in-flight request with finish_reason "abort" (the server is shutting
        down): each handler answers, or ends its stream, normally. Returns how many."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.put(stream.abort_delta())
        if streams and self.dead_reason is None:
            logger.info("shutting down: aborting %d in-flight request(s)", len(streams))
            self.transport.send(Abort([s.request_id for s in streams]))
        return len(streams)

    async def call(self, method: UtilityMethod, lora: WireLora | None = None) -> bool | None:
        """Run a utility method in the engine; ApiError 500/503 when it fails or times out,
        the engine's 400/404 when it refused the caller's argument (an adapter)."""
        if self.dead_summary is not None:
            raise EngineDeadError(self.dead_summary)
        call_id = next(self._call_ids)
        future: asyncio.Future[UtilityResult] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self.transport.send(Utility(call_id, method, lora))
        try:
            result = await asyncio.wait_for(future, self.rpc_timeout_s)
        except TimeoutError:
            raise ApiError(
                f"the engine did not answer {method} within VLLM_RPC_TIMEOUT="
                f"{self.env.VLLM_RPC_TIMEOUT} ms",
                500,
            ) from None
        finally:
            self._calls.pop(call_id, None)
        if not result.ok:
            if result.status < 500:
                code = "model_not_found" if result.status == 404 else None
                raise ApiError(result.error or method, result.status, code=code)
            raise ApiError(f"{method} failed: {result.error}", 500)
        return result.value

    # engine -> frontend ---------------------------------------------------------------
    async def _receive_loop(self) -> None:
        try:
            await self._handle_messages()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Without this loop no request can finish: fail them all rather than hang.
            logger.exception("handling the engine's messages failed")
            self._die("the frontend failed while handling the engine's outputs")

    async def _handle_messages(self) -> None:
        chunk = max(1, self.env.VLLM_V1_OUTPUT_PROC_CHUNK_SIZE)
        while True:
            messages = await self.transport.receive()
            self._last_heard = time.monotonic()
            for msg in messages:
                if isinstance(msg, Outputs):
                    self.stats = msg.stats
                    for rejected in msg.rejected:
                        stream = self._streams.pop(rejected.request_id, None)
                        if stream is not None:
                            stream.put(
                                ApiError(
                                    rejected.message,
                                    rejected.status,
                                    param=rejected.param,
                                    code=rejected.code,
                                )
                            )
                    for start in range(0, len(msg.deltas), chunk):
                        if start:
                            # Let request handlers run between chunks of a large batch.
                            await asyncio.sleep(0)
                        self._dispatch(msg.deltas[start : start + chunk])
                elif isinstance(msg, UtilityResult):
                    future = self._calls.get(msg.call_id)
                    if future is not None and not future.done():
                        future.set_result(msg)
                elif isinstance(msg, Dead):
                    self._die(f"the engine failed:\n{msg.message}")
                    return

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        now = time.monotonic()
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue  # aborted while this output was in flight
            if self.metrics is not None:
                num_new = sum(len(c.token_ids) for c in delta.completions)
                self.metrics.on_tokens(stream.times, now, num_new)
                if delta.finished:
                    reasons = [c.finish_reason or "abort" for c in delta.completions]
                    self.metrics.on_finished(stream.times, now, reasons)
            if delta.finished:
                del self._streams[delta.request_id]
            stream.put(delta)

    async def _watchdog(self) -> None:
        timeout = float(self.env.VLLM_ENGINE_ITERATION_TIMEOUT_S)
        while self.dead_reason is None:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            reason = self.transport.exit_reason()
            # Its last messages first: a Dead message says why better than the exit does.
            if reason is not None and not self.transport.pending():
                self._die(reason)
                return
            silent = time.monotonic() - self._last_heard
            if silent > timeout and not self.transport.pending():
                self._die(
                    f"the engine has not answered for {silent:.1f} s, over "
                    f"VLLM_ENGINE_ITERATION_TIMEOUT_S={self.env.VLLM_ENGINE_ITERATION_TIMEOUT_S}"
                )
                return

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None or self._stopping:
            return
        self.dead_reason = reason
        logger.error("engine dead: %s", reason)
        self.transport.kill()
        error = EngineDeadError(self.dead_summary)
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if self.on_dead is not None:
            self.on_dead(reason)
