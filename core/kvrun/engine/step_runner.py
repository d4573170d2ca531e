"""The step runner contract: what the engine loop calls to run one scheduler step.

The engine loop (:class:`~kvrun.engine.llm_engine.LLMEngine`) knows nothing of models,
devices or KV caches: it hands each step's chunks to a :class:`StepRunner` and samples
from the logits it returns. Implementations:

- :class:`~kvrun.engine.model_runner.ModelRunner`: the core model in this process over
  the platform's attention and paged KV cache (with the platform's fused decode step or
  captured decode graphs when it offers them);
- :class:`~kvrun.engine.executor_runner.ExecutorRunner`: a platform's whole-model
  executor (OpenVINO, XLA), which owns the model and its cache;
- a runner of N workers driven over a channel (tensor/pipeline parallelism): the
  arguments are plain data (:class:`~kvrun.scheduling.output.ScheduledChunk`
  dataclasses and request ids) that can be broadcast as typed messages, and only the
  sampling rows' logits come back; the KV caches stay with the workers.

A runner may also accept several batches in flight (:class:`ConcurrentStepRunner`: the
mp and Ray executors with pipeline parallelism, one batch per stage), so that each pipeline
stage works on a batch while the next one works on the one before; the engine loop
then submits up to :func:`concurrent_batches` batches before it collects the oldest.
Every other runner is driven through ``execute`` alone, one step at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.engine.batch import StepLogits
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["CausalLM", "ConcurrentStepRunner", "StepRunner", "concurrent_batches"]


class StepRunner(Protocol):
    """Runs one scheduler step. Complete when constructed: weights loaded, KV cache
    allocated, any fused or captured decode paths attached; nothing is set on it later.

    Invariants:
    - ``execute`` returns one logits row per chunk with ``samples`` set, in chunk order,
      as float32 ``[S, vocab]``; ``request_ids[i]`` names row i's request;
    - for each request in ``prompt_logits_for`` whose chunk runs, ``prompt_logits`` holds
      the logits of every row of that chunk (row j predicts prompt token start + j + 1);
    - a request in ``hidden_for`` (pooling) gets no logits row: ``hidden`` holds the final
      hidden states of every row of its chunk, and a runner that cannot return them
      raises (the builder refuses the pooling runner on such platforms first);
    - a chunk's K/V land in the cache slots its ``block_ids`` name, so that later steps
      (and other requests sharing those blocks through the prefix cache) read them;
    - results do not depend on which other chunks share the step beyond float rounding
      (greedy parity is checked against transformers in float32).
    """

    block_size: int  # tokens per KV block, as the scheduler was built with
    returns_hidden_states: bool  # execute() can honour hidden_for (pooling requests)

    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits: ...

    def commit_kv_cache(self) -> int:
        """Write every byte of the KV cache this runner owns once, so that memory the
        platform allocated lazily (the cpu plugin's calloc'd pool) is resident now, not
        page by page as requests first reach it. Returns the bytes written; 0 where the
        cache is not this runner's to write (an executor's own)."""
        ...


class ConcurrentStepRunner(StepRunner, Protocol):
    """A StepRunner that takes up to ``max_concurrent_batches`` steps in flight.

    Invariants (on top of StepRunner's, which ``collect`` honours for each step):
    - ``submit`` starts a step and returns without waiting for it; at most
      ``max_concurrent_batches`` steps are submitted and not yet collected (one more
      raises);
    - ``collect`` waits for the oldest submitted step and returns its StepLogits: steps
      run and are collected in submission order, so a step's K/V writes come after
      those of every step submitted before it (a later step may read them);
    - the tensors ``collect`` returns stay valid until ``max_concurrent_batches`` more
      steps are submitted (the engine samples from them before it submits the next);
    - ``execute`` is ``submit`` then ``collect`` of that step, with nothing else in
      flight.
    """

    max_concurrent_batches: int

    def submit(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> None: ...

    def collect(self) -> StepLogits: ...


def concurrent_batches(runner: object) -> int:
    """How many steps the engine may keep in flight on ``runner``: its
    ``max_concurrent_batches`` (a ConcurrentStepRunner), else 1. A runner that claims
    more than one without ``submit`` and ``collect``, or a count that is not a positive
    integer, raises ValueError."""
    n = getattr(runner, "max_concurrent_batches", 1)
    name = type(runner).__name__
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}.max_concurrent_batches={n!r}: a positive integer is accepted")
    if n > 1 and not all(callable(getattr(runner, m, None)) for m in ("submit", "collect")):
        raise ValueError(
            f"{name}.max_concurrent_batches={n} but it has no submit() and collect(): "
            "a runner without them takes 1"
        )
    return n


class CausalLM(Protocol):
    """A core model as the eager runner drives it."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
