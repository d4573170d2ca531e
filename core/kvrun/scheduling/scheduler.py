"""Continuous batching: which requests compute which tokens each step, under one budget."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from kvrun.scheduling.block_manager import BlockManager, PrefixHit
from kvrun.scheduling.config import SchedulerConfig
from kvrun.scheduling.free_blocks import FreeBlockPolicy
from kvrun.scheduling.output import ScheduledChunk, SchedulerOutput, SchedulerStats
from kvrun.scheduling.request import Request, RequestStatus

# SchedulerConfig is re-exported so callers can take both from one module.
__all__ = ["Scheduler", "SchedulerConfig", "check_stop"]


def check_stop(request: Request, max_model_len: int) -> tuple[RequestStatus, int | None] | None:
    """The token-based stop that the newest output token triggers, as (status, stop_reason).

    In order: EOS (unless ignore_eos) and stop_token_ids, both only once min_tokens are
    generated; then max_tokens; then max_model_len. None when the request goes on.
    """
    token = request.output_token_ids[-1]
    if request.num_output_tokens >= request.min_tokens:
        if not request.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if token in request.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
    if request.num_output_tokens >= request.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute.

    Invariants:
    - Each step computes at most ``max_num_batched_tokens`` tokens, and at most
      ``max_num_seqs`` requests hold blocks (``running``).
    - Running requests are kept in the order they were added and scheduled first, in
      that order (decodes and unfinished prefill chunks alike); waiting requests are then
      admitted first come first served, never skipping the head of the queue.
    - A chunk computes tokens ``[num_computed_tokens, num_computed_tokens + q)`` of the
      request's prompt + output; it samples only when it reaches the last known token,
      so a request never samples while its (re)compute is incomplete.
    - ``num_computed_tokens`` advances in ``update``, after the model ran; blocks filled
      by computed tokens are then registered in the prefix cache.
    - At most ``max_loras`` distinct LoRA adapters are among the running requests: a
      waiting request whose adapter would be one more waits at the head of the queue.
    - When a running request needs a block and none is free, the most recently added
      running request that is not yet scheduled this step is preempted: its blocks are
      freed, ``num_computed_tokens`` drops to 0 and it goes to the front of the waiting
      queue. On resume it recomputes prompt + output and the sample at the end of that
      recompute is its next token, so outputs equal those of an unpressured run. No
      waiting request is admitted in a step that preempted.
    - With ``sliding_window`` (every attention layer windowed), a running request's
      blocks that hold only positions before ``num_computed_tokens - W + 1`` (the first
      one its next query sees) are released when it is next scheduled, and a prefix
      hit's blocks before that position are never adopted: a request holds at most the
      blocks of one step's span (``kvrun.scheduling.capacity.blocks_needed``), and
      admission and preemption count only those. Released entries stay in its block
      table as ``NULL_BLOCK`` (the attention never reads outside the window).
    - At most ``max_concurrent_batches`` non-empty outputs are in flight (scheduled, not
      yet passed to ``update``); with 1, ``schedule`` and ``update`` alternate. Outputs
      are passed to ``update`` in the order they were scheduled.
    - A request with a chunk in flight is busy: it is not scheduled again, preempted or
      freed until its output is passed to ``update``. ``finish_request`` on a busy
      request (an abort) takes effect then: its blocks stay held (the workers may still
      be writing them) and the step's token for it is dropped.
    - With ``max_concurrent_batches`` N > 1 a batch takes at most ceil(R / N) requests,
      R the unfinished requests up to ``max_num_seqs``, so that the N batches in flight
      share the requests that can run and no pipeline stage idles for want of a batch.
    - Finished requests are forgotten at once (``get_request`` returns None) after their
      blocks are freed; their ids appear in the next output's ``newly_finished_request_ids``.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        free_block_policy: FreeBlockPolicy | None = None,
        *,
        max_concurrent_batches: int = 1,
    ) -> None:
        if not isinstance(max_concurrent_batches, int) or max_concurrent_batches < 1:
            raise ValueError(
                f"max_concurrent_batches={max_concurrent_batches!r}: a positive integer is "
                "accepted (the step runner's batches in flight)"
            )
        self.config = config
        self.max_concurrent_batches = max_concurrent_batches
        # free_block_policy: the platform's order for handing out free blocks; None = FIFO.
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            free_block_policy,
        )
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._order: dict[str, int] = {}  # add order of each unfinished request
        self._next_order = 0
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # sorted by add order
        self._finished_ids: list[str] = []  # since the last schedule
        self._in_flight: deque[SchedulerOutput] = deque()  # oldest first
        self._busy: set[str] = set()  # requests with a chunk in flight
        # busy requests finished meanwhile (abort): their status, when their output returns
        self._finish_on_return: dict[str, tuple[RequestStatus, int | str | None]] = {}
        self._num_preemptions = 0

    # ---- requests ---------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self._requests, f"duplicate id {request.request_id!r}"
        assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0
        assert not request.output_token_ids and not request.block_ids
        # The engine validates prompt length; a prompt of max_model_len still samples once.
        assert request.num_prompt_tokens <= self.config.max_model_len, (
            f"prompt of {request.num_prompt_tokens} tokens exceeds "
            f"max_model_len={self.config.max_model_len}"
        )
        assert not request.lora_id or self.config.max_loras, "an adapter with max_loras=0"
        self._requests[request.request_id] = request
        self._order[request.request_id] = self._next_order
        self._next_order += 1
        self._waiting.append(request)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, else None."""
        return self._requests.get(request_id)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a request (stop string, abort) and free its blocks; None if unknown or done.

        A busy request (a chunk in flight) ends when its output is passed to ``update``:
        until then it keeps its blocks and ``get_request`` still finds it."""
        assert status.is_finished(), f"{status} is not a finished status"
        request = self._requests.get(request_id)
        if request is None or request_id in self._finish_on_return:
            return None
        if request_id in self._busy:
            self._finish_on_return[request_id] = (status, stop_reason)
            return request
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._finish(request, status, stop_reason)
        return request

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort each known unfinished request; returns those aborted."""
        aborted = []
        for request_id in request_ids:
            request = self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            if request is not None:
                aborted.append(request)
        return aborted

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def is_in_flight(self, request_id: str) -> bool:
        """Whether the request has a chunk in an output not yet passed to ``update``."""
        return request_id in self._busy

    @property
    def num_in_flight(self) -> int:
        """Outputs scheduled and not yet passed to ``update``."""
        return len(self._in_flight)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions_total=self._num_preemptions,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; False (nothing done) while any request holds blocks."""
        return self.block_manager.reset_prefix_cache()

    # ---- the step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        assert len(self._in_flight) < self.max_concurrent_batches, (
            "schedule() called again before update()"
            if self.max_concurrent_batches == 1
            else f"schedule() with {len(self._in_flight)} outputs in flight already"
        )
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        max_requests = self._batch_requests()

        # Running requests first, oldest first, busy ones skipped; victims are the last
        # ones not busy, so everything before index i (scheduled this step) and every busy
        # request is safe from preemption.
        i = 0
        while i < len(self._running) and budget > 0 and len(chunks) < max_requests:
            request = self._running[i]
            if request.request_id in self._busy:
                i += 1
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, f"running request {request.request_id!r} has nothing to do"
            keep_from = self._keep_from(request.num_computed_tokens)
            table = self.block_manager.allocate(
                request.request_id, request.num_computed_tokens + num_new, keep_from=keep_from
            )
            while table is None:
                victim = self._running.pop(self._victim_index(i))
                assert victim is not request or self._running, (
                    f"request {request.request_id!r} cannot grow to "
                    f"{request.num_computed_tokens + num_new} tokens with every other "
                    f"request preempted ({self.config.num_blocks} blocks)"
                )
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
                table = self.block_manager.allocate(
                    request.request_id,
                    request.num_computed_tokens + num_new,
                    keep_from=keep_from,
                )
            if table is None:
                break  # the request preempted itself; it was the last one not busy
            chunks.append(self._make_chunk(request, num_new, table))
            budget -= num_new
            i += 1

        # Then waiting requests, first come first served, unless memory was short.
        while (
            self._waiting
            and budget > 0
            and not preempted
            and len(self._running) < self.config.max_num_seqs
            and len(chunks) < max_requests
        ):
            request = self._waiting[0]
            admitted = self._admit(request, budget)
            if admitted is None:
                break
            self._waiting.popleft()
            chunks.append(admitted)
            budget -= admitted.num_tokens

        output = SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_request_ids=preempted,
            newly_finished_request_ids=self._finished_ids,
        )
        self._finished_ids = []
        if chunks:
            self._in_flight.append(output)
            self._busy.update(chunk.request_id for chunk in chunks)
        return output

    def update(
        self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]]
    ) -> list[Request]:
        """Record that ``output`` ran: advance computed tokens, append samples, apply stops.

        ``sampled`` maps the id of each sampling chunk's request to its sampled token(s)
        (a ``prompt_only`` request has none: it finishes when its last chunk ran).
        ``output`` must be the oldest output in flight. Returns the requests that got a
        new token or finished their prompt (not those finished while it ran).
        """
        if not output.chunks:
            return []
        assert self._in_flight and output is self._in_flight[0], (
            "update() got an output that is not the oldest in flight"
        )
        self._in_flight.popleft()
        updated: list[Request] = []
        for chunk in output.chunks:
            self._busy.discard(chunk.request_id)
            request = self._requests.get(chunk.request_id)
            if request is None:
                continue
            ended = self._finish_on_return.pop(chunk.request_id, None)
            if ended is not None:  # finished (aborted) while its chunk ran
                self._running.remove(request)
                self._finish(request, *ended)
                continue
            assert request.status is RequestStatus.RUNNING
            assert request.num_computed_tokens == chunk.start_position
            request.num_computed_tokens += chunk.num_tokens
            self.block_manager.commit(
                request.request_id,
                request.all_token_ids,
                request.num_computed_tokens,
                request.cache_salt,
            )
            if not chunk.samples:
                assert chunk.request_id not in sampled, f"{chunk.request_id!r} cannot sample"
                continue
            if request.prompt_only:  # its prompt is computed: nothing more to do
                assert chunk.request_id not in sampled, f"{chunk.request_id!r} samples nothing"
                self._running.remove(request)
                self._finish(request, RequestStatus.FINISHED_STOPPED, None)
                updated.append(request)
                continue
            tokens = sampled.get(chunk.request_id)
            assert tokens, f"no sampled token for {chunk.request_id!r}"
            for token in tokens:
                request.append_output_token(token)
                stop = check_stop(request, self.config.max_model_len)
                if stop is not None:
                    self._running.remove(request)
                    self._finish(request, *stop)
                    break
            updated.append(request)
        return updated

    # ---- helpers ----------------------------------------------------------------------

    def _batch_requests(self) -> int:
        """How many requests one batch takes: all it can with one batch in flight; with
        N, ceil(R / N), R the unfinished requests (busy ones count: they come back) up to
        max_num_seqs (those that can run at once)."""
        if self.max_concurrent_batches == 1:
            return self.config.max_num_seqs
        live = len(self._requests) - len(self._finish_on_return)
        runnable = min(live, self.config.max_num_seqs)
        return max(1, math.ceil(runnable / self.max_concurrent_batches))

    def _victim_index(self, i: int) -> int:
        """The index in running of the preemption victim for running[i]: the last request
        at i or after that is not busy (running[i] itself, which is not, at worst)."""
        j = len(self._running) - 1
        while self._running[j].request_id in self._busy:
            j -= 1
        assert j >= i
        return j

    def _admit(self, request: Request, budget: int) -> ScheduledChunk | None:
        """Allocate a waiting request's first chunk and move it to running; None if it can't."""
        bm = self.block_manager
        if request.lora_id and not self._adapter_fits(request.lora_id):
            return None
        hit: PrefixHit | None = None
        if bm.enable_prefix_caching and not request.skip_prefix_cache:
            hit = bm.find_prefix(request.all_token_ids, request.cache_salt)
        num_computed = hit.num_tokens if hit is not None else 0
        remaining = request.num_tokens - num_computed
        if not self.config.enable_chunked_prefill and remaining > budget:
            return None
        num_new = min(remaining, budget)
        table = bm.allocate(
            request.request_id, num_computed + num_new, hit, self._keep_from(num_computed)
        )
        if table is None:
            return None
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = num_computed
        request.num_computed_tokens = num_computed
        request.status = RequestStatus.RUNNING
        order = self._order
        bisect.insort(self._running, request, key=lambda r: order[r.request_id])
        return self._make_chunk(request, num_new, table)

    def _keep_from(self, num_computed: int) -> int:
        """The first position a request's next chunk (starting at ``num_computed``) sees:
        ``num_computed - W + 1`` with a sliding window on every layer, else 0 (all)."""
        window = self.config.sliding_window
        return max(0, num_computed - window + 1) if window is not None else 0

    def _adapter_fits(self, lora_id: int) -> bool:
        """Whether a request with this adapter may run next to the running ones: at most
        ``max_loras`` distinct adapters run at once (the engine's device slots)."""
        running = {r.lora_id for r in self._running if r.lora_id}
        return lora_id in running or len(running) < self.config.max_loras

    def _make_chunk(self, request: Request, num_new: int, table: list[int]) -> ScheduledChunk:
        request.block_ids = table
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            start_position=start,
            block_ids=list(table),
            samples=start + num_new == request.num_tokens,
            # A lone token after earlier outputs is a decode even when it ends a recompute.
            is_prefill=num_new > 1 or request.num_output_tokens == 0,
            lora_id=request.lora_id,
            multi_modal=request.multi_modal,
        )

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._waiting.appendleft(request)

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None
    ) -> None:
        """Mark a request finished; the caller has already taken it off its queue."""
        self.block_manager.free(request.request_id)
        request.block_ids = []
        request.status = status
        request.finish_reason = status.finish_reason
        request.stop_reason = stop_reason
        del self._requests[request.request_id]
        del self._order[request.request_id]
        self._finished_ids.append(request.request_id)
