"""The engine loop: requests in, scheduler step, model step, sampler, outputs.

One :meth:`LLMEngine.step` schedules a batch (prefill chunks and decodes under
one token budget), runs the model on the selected platform, samples a token for
each request that reached the end of its known tokens, and lets the scheduler
append tokens, apply stops and free blocks. Everything device-specific is behind the
step runner (:class:`~kvrun.engine.step_runner.StepRunner`) and the platform that
:mod:`kvrun.engine.builder` built; the loop itself runs on any runner, a fake one in
its own tests included.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from kvrun.config import EngineArgs, EngineConfig
from kvrun.engine.batch import StepLogits
from kvrun.engine.builder import EngineParts, build_engine_parts
from kvrun.engine.grammar_queue import GrammarQueue
from kvrun.engine.pooling_state import PoolingState
from kvrun.engine.sampling_step import SamplingStep
from kvrun.engine.sequence import ParentRequest, SequenceState, make_detokenizer
from kvrun.engine.step_runner import ConcurrentStepRunner, StepRunner, concurrent_batches
from kvrun.envs import EnvSnapshot
from kvrun.errors import RequestError
from kvrun.lora.request import LoRARequest
from kvrun.outputs import RequestDelta, RequestMetrics
from kvrun.platforms import Platform
from kvrun.pooling import PoolingParams
from kvrun.sampling_params import SamplingParams
from kvrun.scheduling.output import ScheduledChunk, SchedulerOutput
from kvrun.scheduling.request import Request, RequestStatus
from kvrun.scheduling.scheduler import Scheduler
from kvrun.stats import EngineStats
from kvrun.validation import check_prompt, resolve_max_tokens

__all__ = ["LLMEngine"]

logger = logging.getLogger(__name__)


class LLMEngine:
    """Synchronous engine: call :meth:`add_request`, then :meth:`step` until idle.

    Built from its parts (:class:`~kvrun.engine.builder.EngineParts`), each complete;
    :meth:`from_args` resolves the configuration and builds them.
    """

    def __init__(self, parts: EngineParts, env: EnvSnapshot) -> None:
        self.env = env
        self.platform = parts.platform
        self.config: EngineConfig = parts.config
        self.tokenizer = parts.tokenizer
        self.scheduler: Scheduler = parts.scheduler
        self.runner: StepRunner = parts.runner
        self.lora = parts.lora  # LoRA adapters (enable_lora), else None
        self.multimodal = parts.multimodal  # media processing (a multimodal model), else None
        self.sampling = SamplingStep(
            self.platform.device,
            logits_processor_threads=env.VLLM_LOGITS_PROCESSOR_THREADS or 0,
            top_k_top_p=parts.top_k_top_p,
            apply_token_bitmask=parts.apply_token_bitmask,
            argmax=parts.argmax,
        )
        self._parents: dict[str, ParentRequest] = {}
        # constrained requests while their grammar compiles, and those it refused
        self.grammars = GrammarQueue(
            self.tokenizer, self.config.vocab_size, self.config.structured_outputs_backend
        )
        self._failed: list[tuple[str, RequestError]] = []
        self._pooling: dict[str, PoolingState] = {}  # pooling requests
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._last_batch_log = time.monotonic()
        self._profiler: object | None = None
        # batches submitted to a ConcurrentStepRunner and not yet collected, oldest first
        self._max_batches = concurrent_batches(self.runner)
        if self.scheduler.max_concurrent_batches != self._max_batches:
            raise ValueError(
                f"the scheduler takes {self.scheduler.max_concurrent_batches} batch(es) in "
                f"flight but the step runner {type(self.runner).__name__} takes "
                f"{self._max_batches}; build the Scheduler with max_concurrent_batches="
                f"{self._max_batches}"
            )
        self._in_flight: deque[_Batch] = deque()

    @classmethod
    def from_args(
        cls,
        args: EngineArgs,
        env: EnvSnapshot,
        platform: Platform | None = None,
        *,
        entry_point: str = "offline",  # "serve" in the server's engine process
    ) -> LLMEngine:
        """Resolve the configuration once and build the engine (``platform``: one already
        built, else selected from ``env``)."""
        return cls(build_engine_parts(args, env, platform, entry_point), env)

    # requests -----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | Mapping[str, Any],
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request; a RequestError (or ValueError) says why one is refused.

        ``prompt`` may be vLLM's dict: ``{"prompt": str}`` or ``{"prompt_token_ids":
        [...]}``, with ``"multi_modal_data": {"image": ..., "video": ...}`` and
        ``"mm_processor_kwargs": {...}`` for a multimodal model
        (:mod:`kvrun.multimodal.processing` says what each takes)."""
        self._check_request_id(request_id)
        multi_modal_data = None
        processor_kwargs = None
        if isinstance(prompt, Mapping):
            processor_kwargs = prompt.get("mm_processor_kwargs")
            prompt, multi_modal_data = _prompt_and_media(prompt)
        if self.config.runner != "generate":
            raise RequestError(
                "this engine runs its model as a pooling model (runner='pooling'): it makes "
                "embeddings and scores, not text; generation needs runner='generate'",
                param="model",
            )
        prompt_text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        config = self.config
        multi_modal = None
        if processor_kwargs is not None and self.multimodal is None:
            raise RequestError(
                f"mm_processor_kwargs applies to a multimodal model's processor; "
                f"{config.architecture} takes text only",
                param="mm_processor_kwargs",
            )
        if processor_kwargs is not None and self.multimodal is not None and not multi_modal_data:
            # no media to process: the keys and values are still checked (an unknown key
            # is the same error with or without media), then they have nothing to act on
            self.multimodal.check_request_kwargs(processor_kwargs)
            _log_kwargs_without_media()
        if multi_modal_data:
            if self.multimodal is None:
                raise RequestError(
                    f"{config.architecture} takes text only; multi_modal_data needs a model "
                    "that accepts media (Qwen2-VL: image, video)",
                    param="multi_modal_data",
                )
            token_ids, multi_modal = self.multimodal.process(
                token_ids, multi_modal_data, processor_kwargs
            )
        check_prompt(token_ids, vocab_size=config.vocab_size, max_model_len=config.max_model_len)
        params.verify(config.vocab_size, config.max_logprobs)
        if params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)  # a RequestError naming the field
        max_tokens = resolve_max_tokens(
            params.max_tokens, prompt_len=len(token_ids), max_model_len=config.max_model_len
        )
        if lora_request is not None:
            self.add_lora(lora_request)  # read and checked now: a LoraError refuses it
        now = time.monotonic()
        parent = ParentRequest(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=token_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=arrival_time or now),
        )
        bad_words = self._bad_words_ids(params.bad_words or [])
        eos = self.tokenizer.eos_token_ids
        cache_salt = lora_request.cache_salt if lora_request else b""
        if multi_modal is not None:  # other media, other KV: the hashes seed the chain
            cache_salt += multi_modal.cache_salt
        requests = []
        for index in range(params.n):
            seq_params = params
            if params.n > 1 and params.seed is not None:
                seq_params = replace(params, seed=params.seed + index)
            state = SequenceState(
                parent=parent,
                index=index,
                params=seq_params,
                generator=self.sampling.make_generator(seq_params.seed),
                detokenizer=make_detokenizer(self.tokenizer, token_ids, seq_params),
                bad_words_ids=bad_words,
                eos_token_ids=eos,
            )
            parent.sequences.append(state)
            request = Request(
                request_id=self._seq_id(request_id, index, params.n),
                prompt_token_ids=token_ids,
                max_tokens=max_tokens,
                min_tokens=params.min_tokens,
                ignore_eos=params.ignore_eos,
                eos_token_ids=eos,
                stop_token_ids=frozenset(params.stop_token_ids or ()),
                arrival_time=parent.metrics.arrival_time,
                payload=state,
                skip_prefix_cache=params.prompt_logprobs is not None,
                lora_id=lora_request.lora_int_id if lora_request else 0,
                cache_salt=cache_salt,
                multi_modal=multi_modal,
            )
            requests.append(request)
        if params.structured_outputs is None:
            for request in requests:
                self.scheduler.add_request(request)
        else:
            self.grammars.hold(request_id, requests, params.structured_outputs)
        self._parents[request_id] = parent
        self._prompt_tokens_total += len(token_ids)

    def add_pooling_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: PoolingParams,
        *,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a pooling request (an embedding, a score's half, a classification): its one
        delta, when it finishes, carries the pooled vector (``RequestDelta.pooled``) and no
        sequences. It shares the steps with generation requests on a generating engine.
        ``lora_request``: the hidden states are the adapted model's (as for generation)."""
        self._check_request_id(request_id)
        config = self.config
        if config.pooler is None or not self.runner.returns_hidden_states:
            raise RequestError(
                f"embeddings and scores need the model's hidden states, which the "
                f"{self.platform.name} platform's whole-model executor does not return; "
                "run them on a platform that runs kvrun's own model code (cpu, cuda, rocm, "
                "hpu)",
                param="model",
            )
        self._check_task(params)
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(token_ids, vocab_size=config.vocab_size, max_model_len=config.max_model_len)
        params.verify(config.hidden_size, config.matryoshka)
        if lora_request is not None:
            self.add_lora(lora_request)  # read and checked now: a LoraError refuses it
        now = time.monotonic()
        state = PoolingState(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=token_ids,
            params=params,
            pooler=config.pooler,
            metrics=RequestMetrics(arrival_time=arrival_time or now),
            classify=config.convert == "classify",
        )
        self.scheduler.add_request(
            Request(
                request_id=request_id,
                prompt_token_ids=token_ids,
                max_tokens=1,
                arrival_time=state.metrics.arrival_time,
                payload=state,
                prompt_only=True,
                skip_prefix_cache=config.pooler.needs_every_position,
                lora_id=lora_request.lora_int_id if lora_request else 0,
                cache_salt=lora_request.cache_salt if lora_request else b"",
            )
        )
        self._pooling[request_id] = state
        self._prompt_tokens_total += len(token_ids)

    def _check_task(self, params: PoolingParams) -> None:
        """Embeddings and scores need an embedding model, classes a classifier."""
        classifier = self.config.convert == "classify"
        if params.task == "classify" and not classifier:
            raise RequestError(
                f"classification needs a *ForSequenceClassification model; "
                f"{self.config.architecture} runs as an embedding model here",
                param="model",
            )
        if params.task in ("embed", "score") and classifier:
            raise RequestError(
                f"{self.config.architecture} is a classifier: it gives class probabilities "
                "(classify), not embeddings or scores",
                param="model",
            )
        if classifier and params.dimensions is not None:
            raise RequestError.invalid(
                "dimensions", params.dimensions, "None: a classifier's output is its classes"
            )

    # LoRA adapters (vLLM's names) -----------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter now (requests naming it then start without reading
        it); a LoraError (a RequestError) says why it cannot run."""
        if self.lora is None:
            raise RequestError(
                "a LoRA adapter needs the engine started with enable_lora=True (--enable-lora)",
                param="lora_request",
            )
        self.lora.add(lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; False when this engine did not know it."""
        return self.lora is not None and self.lora.remove(lora_id)

    def list_loras(self) -> set[int]:
        return set(self.lora.list_loras()) if self.lora is not None else set()

    def _check_request_id(self, request_id: str) -> None:
        if request_id in self._parents or request_id in self._pooling:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")

    def abort_request(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            if self._pooling.pop(request_id, None) is not None:
                self.scheduler.abort_requests([request_id])
                continue
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            if self.grammars.drop(request_id):
                continue  # never reached the scheduler
            n = len(parent.sequences)
            ids = [self._seq_id(request_id, i, n) for i in range(n)]
            self.scheduler.abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or batches still in flight (a step collects them)."""
        return bool(self._parents or self._pooling or self._in_flight)

    def take_failed_requests(self) -> list[tuple[str, RequestError]]:
        """Requests refused after :meth:`add_request` returned (a grammar that did not
        compile in time), each with its error, once; they are no longer unfinished."""
        failed, self._failed = self._failed, []
        return failed

    def _admit_compiled(self) -> None:
        """Constrained requests whose grammar is ready join the scheduler; those it
        refused finish here, reported by :meth:`take_failed_requests`."""
        admitted, refused = self.grammars.ready(idle=not self.scheduler.has_unfinished_requests())
        for request in admitted:
            self.scheduler.add_request(request)
        for request_id, error in refused:
            self._parents.pop(request_id, None)
            self._failed.append((request_id, error))

    # the loop ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestDelta]:
        """Run one scheduler + model step; what it added to each request that progressed.

        Feed the deltas to an :class:`~kvrun.engine.output_accumulator.OutputAccumulator`
        for vLLM-shaped RequestOutputs; a request's last delta has ``finished`` set.

        On a runner that takes several batches in flight (pipeline parallelism on the mp
        executor) a step first fills the runner up to that many batches, then processes
        the oldest: its outputs are those of one batch, in submission order.
        """
        self._admit_compiled()
        now = time.monotonic()  # the time this step's tokens are marked with
        if self._max_batches > 1:
            return self._step_in_flight(now)
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        batch = self._batch(out)
        return self._process(batch, self._execute(batch), now)

    def _step_in_flight(self, now: float) -> list[RequestDelta]:
        """:meth:`step` on a ConcurrentStepRunner: submit batches until
        ``max_concurrent_batches`` are in flight (the scheduler leaves out requests with
        a batch in flight), then collect and process the oldest; the others run
        meanwhile. Outputs come in submission order."""
        runner = cast(ConcurrentStepRunner, self.runner)  # concurrent_batches checked it
        while len(self._in_flight) < self._max_batches:
            out = self.scheduler.schedule()
            if not out.chunks:
                break
            batch = self._batch(out)
            runner.submit(out.chunks, batch.prompt_logits_for, batch.pooling)
            self._in_flight.append(batch)
        if not self._in_flight:
            return []
        logits = runner.collect()
        return self._process(self._in_flight.popleft(), logits, now)

    def _batch(self, out: SchedulerOutput) -> _Batch:
        """What a scheduled batch asks of the runner beyond its chunks."""
        pooling = frozenset(c.request_id for c in out.chunks if c.request_id in self._pooling)
        wants_prompt_logprobs = frozenset(
            chunk.request_id
            for chunk in out.chunks
            if chunk.request_id not in pooling
            and self._needs_prompt_logprobs(chunk.request_id, chunk.start_position)
        )
        return _Batch(out, wants_prompt_logprobs, pooling)

    def _execute(self, batch: _Batch) -> StepLogits:
        chunks = batch.output.chunks
        if batch.pooling:
            return self.runner.execute(chunks, batch.prompt_logits_for, batch.pooling)
        return self.runner.execute(chunks, batch.prompt_logits_for)

    def _process(self, batch: _Batch, logits: StepLogits, now: float) -> list[RequestDelta]:
        """Sample from a batch's logits, let the scheduler update, make the deltas."""
        out = batch.output
        for chunk in out.chunks:
            state_of = self._pooling.get(chunk.request_id)
            if chunk.request_id in batch.pooling and state_of is not None:  # not aborted
                state_of.add_chunk(chunk.start_position, logits.hidden[chunk.request_id])
        states = [self._state(rid) for rid in logits.request_ids]
        sampled = self.sampling.sample(logits.logits, states)
        for chunk in out.chunks:
            if chunk.request_id in logits.prompt_logits:
                self._add_prompt_logprobs(chunk, logits.prompt_logits[chunk.request_id])
        new_tokens = {rid: [t] for rid, t in zip(logits.request_ids, sampled.token_ids)}
        updated = self.scheduler.update(out, new_tokens)
        logprobs_by_id = dict(zip(logits.request_ids, sampled.logprobs))
        touched: dict[str, ParentRequest] = {}
        outputs = []
        for request in updated:
            if request.prompt_only:
                pooled = self._pooling.pop(request.request_id)
                pooled.metrics.finished_time = time.monotonic()
                outputs.append(pooled.final_delta(request.num_cached_tokens))
                continue
            state: SequenceState = request.payload  # type: ignore[assignment]
            token = request.output_token_ids[-1]
            entry = logprobs_by_id.get(request.request_id)
            if entry is not None:
                entry = self.sampling.decode_logprobs(entry, self.tokenizer)
            # The EOS or stop token that ended the sequence is not text (vLLM's rule).
            ended_by_token = request.status is RequestStatus.FINISHED_STOPPED
            text = not ended_by_token or state.params.include_stop_str_in_output
            stop = state.add_token(token, entry, text=text)
            self._generation_tokens_total += 1
            ended = state.constraint is not None and self._grammar_ended(state, token)
            if stop is not None and not request.status.is_finished():
                self.scheduler.finish_request(
                    request.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop
                )
                state.finish("stop", stop)
            elif ended and not request.status.is_finished():
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
                state.finish("stop", None)
            elif request.status.is_finished():
                state.finish(request.finish_reason or "stop", request.stop_reason)
            parent = state.parent
            parent.metrics.num_cached_tokens = max(
                parent.metrics.num_cached_tokens, request.num_cached_tokens
            )
            parent.mark_token(now)
            touched[parent.request_id] = parent
        for parent in touched.values():
            if parent.finished:
                parent.metrics.finished_time = time.monotonic()
                self._parents.pop(parent.request_id, None)
            outputs.append(parent.take_delta())
        self._maybe_log_batch(len(out.chunks), out.num_batched_tokens)
        return outputs

    @torch.inference_mode()
    def warm_up(self, num_tokens: int = 64, *, commit_kv_cache: bool = False) -> None:
        """Run one prefill of ``num_tokens`` and one decode through the model, outputs
        discarded, so that the first real request does not pay first-use costs.

        ``commit_kv_cache`` first writes the whole KV cache once
        (:meth:`~kvrun.engine.step_runner.StepRunner.commit_kv_cache`), as a server does:
        its resident memory is then its steady state from the first request, an
        oversized cache fails at start rather than hours later, and no request pays a
        first-touch page fault (NOTES.md).

        The steps write the cache's lowest block ids, which no request holds yet (call
        it before adding any) and which the block manager hands out first; the
        scheduler, its prefix cache and the counters are not touched, and the platform
        discards what its backends calibrated on the dummy tokens
        (:meth:`~kvrun.platforms.Platform.discard_calibration`). On the cpu plugin this
        moves the page faults of the lazily zeroed cache from the server's first request
        to its start-up (NOTES.md).
        """
        assert not self._parents, "warm_up() runs before any request is added"
        if commit_kv_cache:
            started = time.monotonic()
            nbytes = self.runner.commit_kv_cache()
            if nbytes:
                logger.info(
                    "KV cache committed: %.2f GiB written in %.2f s",
                    nbytes / 2**30,
                    time.monotonic() - started,
                )
        block_size = self.config.block_size
        num_tokens = max(1, min(num_tokens, self.config.max_model_len - 1))
        blocks = list(range(-(-(num_tokens + 1) // block_size)))
        prompt = [0] * num_tokens
        prefill = ScheduledChunk("warm-up", prompt, 0, blocks, samples=True, is_prefill=True)
        decode = ScheduledChunk("warm-up", [0], num_tokens, blocks, samples=True, is_prefill=False)
        for chunk in (prefill, decode):
            self.runner.execute([chunk])
        self.platform.discard_calibration()

    # stats and control ----------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
        )

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def start_profile(self) -> None:
        from kvrun.engine.profiling import start_profile

        self._profiler = start_profile(self.env.VLLM_TORCH_PROFILER_DIR, self._profiler)

    def stop_profile(self) -> None:
        from kvrun.engine.profiling import stop_profile

        stop_profile(self._profiler)
        self._profiler = None

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    # helpers ----------------------------------------------------------------------------
    @staticmethod
    def _grammar_ended(state: SequenceState, token: int) -> bool:
        """Advance the sequence's grammar by its new token; True when nothing may follow:
        the grammar ended (its stop token, or its last character under ignore_eos), or the
        token was outside it (every token was masked: min_tokens holding back the only stop
        the grammar allowed)."""
        assert state.constraint is not None
        if not state.constraint.accept(token):
            logger.warning(
                "request %s: token %d is outside its structured_outputs grammar; stopping it",
                state.parent.request_id,
                token,
            )
            return True
        return state.constraint.is_terminated()

    @staticmethod
    def _seq_id(request_id: str, index: int, n: int) -> str:
        return request_id if n == 1 else f"{request_id}#{index}"

    def _state(self, seq_id: str) -> SequenceState:
        request = self.scheduler.get_request(seq_id)
        assert request is not None, seq_id
        state: SequenceState = request.payload  # type: ignore[assignment]
        return state

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (how it appears mid-text)."""
        ids: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                tokens = self.tokenizer.encode(variant, add_special_tokens=False)
                if tokens and tokens not in ids:
                    ids.append(tokens)
        return ids

    def _needs_prompt_logprobs(self, seq_id: str, start: int) -> bool:
        """Whether this chunk covers prompt positions whose logprobs are still owed."""
        state = self._state(seq_id)
        if state.params.prompt_logprobs is None or state.index != 0:
            return False
        parent = state.parent
        have = len(parent.prompt_logprobs) if parent.prompt_logprobs else 1
        return have < len(parent.prompt_token_ids) and start < len(parent.prompt_token_ids) - 1

    def _add_prompt_logprobs(self, chunk: ScheduledChunk, chunk_logits: torch.Tensor) -> None:
        """Row j of the chunk's logits predicts prompt token start + j + 1."""
        parent = self._state(chunk.request_id).parent
        prompt = parent.prompt_token_ids
        if parent.prompt_logprobs is None:
            parent.prompt_logprobs = [None]
        first = len(parent.prompt_logprobs) - 1 - chunk.start_position  # first row still owed
        last = min(chunk_logits.shape[0], len(prompt) - 1 - chunk.start_position)
        if first >= last:
            return
        targets = prompt[chunk.start_position + first + 1 : chunk.start_position + last + 1]
        num = parent.params.prompt_logprobs or 0
        entries = self.sampling.prompt_logprobs(chunk_logits[first:last], targets, num)
        parent.prompt_logprobs.extend(
            self.sampling.decode_logprobs(e, self.tokenizer) for e in entries
        )

    def _maybe_log_batch(self, num_seqs: int, num_tokens: int) -> None:
        interval = self.env.VLLM_LOG_BATCHSIZE_INTERVAL
        if interval < 0:
            return
        now = time.monotonic()
        if now - self._last_batch_log >= interval:
            self._last_batch_log = now
            logger.info("batch: %d sequences, %d tokens this step", num_seqs, num_tokens)


@dataclass(frozen=True)
class _Batch:
    """A scheduled batch on its way through the runner."""

    output: SchedulerOutput
    prompt_logits_for: frozenset[str]  # requests whose prompt logprobs this batch owes
    pooling: frozenset[str]  # pooling requests: their hidden states come back


@functools.cache
def _log_kwargs_without_media() -> None:
    """Said once per process: settings that a prompt without media leaves unused."""
    logger.info(
        "a prompt without media gave mm_processor_kwargs: they were checked and have no "
        "effect (they set how media are processed)"
    )


def _prompt_and_media(prompt: Mapping[str, Any]) -> tuple[str | list[int], Any]:
    """vLLM's prompt dict -> (text or token ids, its multi_modal_data or None)."""
    if "prompt_token_ids" in prompt:
        text_or_ids: str | list[int] = [int(t) for t in prompt["prompt_token_ids"]]
    elif "prompt" in prompt:
        text_or_ids = str(prompt["prompt"])
    else:
        raise RequestError.invalid(
            "prompt",
            f"a dict with keys {sorted(prompt)}",
            "a dict with 'prompt' or 'prompt_token_ids'",
        )
    return text_or_ids, prompt.get("multi_modal_data")
