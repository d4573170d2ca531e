"""The sampler: one step's logits and per-row parameters in, one token per row out.

Device-neutral: every tensor it makes lives on the logits' device. Stages run in a
fixed order and a stage no row needs is skipped, so a batch of plain greedy rows
costs an argmax (plus log_softmax when logprobs are asked for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvrun.ops import reference
from kvrun.outputs import Logprob
from kvrun.sampling.logprobs import logprob_dicts
from kvrun.sampling.metadata import SamplingMetadata, SamplingRow
from kvrun.sampling.penalties import apply_penalties
from kvrun.sampling.truncation import (
    TopKTopPSampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    exponential_noise,
    sample_from,
)

__all__ = ["Sampler", "SamplerOutput", "process_logits"]


@dataclass(frozen=True)
class SamplerOutput:
    """What one sampler step produced, row for row with the metadata's rows."""

    sampled: torch.Tensor  # [B] int64 on the logits' device, for the next decode input
    token_ids: list[int]  # [B] the same tokens on the host
    # [B] per row: the chosen token's and top-N candidates' raw logprobs; None where
    # params.logprobs is None. decoded_token is left None for the detokenizer to fill.
    logprobs: list[dict[int, Logprob] | None]


def _run_processors(row: SamplingRow, logits_row: torch.Tensor) -> torch.Tensor:  # [V] -> [V]
    params = row.params
    prompt = tuple(row.prompt_token_ids)
    output = tuple(row.output_token_ids)
    for fn, arity in zip(params.logits_processors or (), params.processor_arities, strict=True):
        logits_row = fn(prompt, output, logits_row) if arity == 3 else fn(output, logits_row)
    return logits_row


def process_logits(
    logits: torch.Tensor,  # [B, V] float32
    md: SamplingMetadata,
    map_rows: Callable[..., Iterable[torch.Tensor]] | None = None,  # an executor's map, or None
) -> torch.Tensor:  # [B, V] float32, what the argmax / draw sees before temperature
    """Allowed ids, logit_bias, bans (bad words, min_tokens), logits processors, penalties."""
    neg_inf = float("-inf")
    if md.allowed_rows is not None and md.allowed_index is not None:
        allowed = torch.zeros(
            md.allowed_rows.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device
        )
        allowed[md.allowed_index] = True  # [A, V]
        logits[md.allowed_rows] = logits[md.allowed_rows].masked_fill(~allowed, neg_inf)
    if md.bias_index is not None and md.bias_values is not None:
        logits.index_put_(md.bias_index, md.bias_values, accumulate=True)
    if md.banned_index is not None:
        logits[md.banned_index] = neg_inf
    if md.processors:
        rows = [i for i, _ in md.processors]
        views = [logits[i] for i in rows]
        inputs = [r for _, r in md.processors]
        results = (map_rows or map)(_run_processors, inputs, views)
        for i, result in zip(rows, results, strict=True):
            logits[i] = result
    if md.output_ids is not None:
        assert md.repetition_penalty is not None
        assert md.frequency_penalty is not None and md.presence_penalty is not None
        logits = apply_penalties(
            logits,
            md.prompt_ids,
            md.output_ids,
            md.repetition_penalty,
            md.frequency_penalty,
            md.presence_penalty,
        )
    return logits


def _sample_random(
    logits: torch.Tensor,  # [R, V] float32, processed
    md: SamplingMetadata,
    platform_sampler: TopKTopPSampler | None = None,
) -> torch.Tensor:  # [R] int64
    assert md.temperature is not None
    logits = logits / md.temperature[:, None]
    if platform_sampler is not None and not md.generators and md.min_p is None:
        rows = logits.shape[0]
        top_k = md.top_k if md.top_k is not None else logits.new_zeros(rows, dtype=torch.int64)
        top_p = md.top_p if md.top_p is not None else logits.new_ones(rows)
        return platform_sampler(logits, top_k, top_p)
    if md.top_k is not None:
        logits = apply_top_k(logits, md.top_k, md.max_top_k)
    probs = torch.softmax(logits, dim=1)  # [R, V]
    if md.top_p is not None:
        probs = apply_top_p(probs, md.top_p)
    if md.min_p is not None:
        probs = apply_min_p(probs, md.min_p)
    return sample_from(probs, exponential_noise(probs, md.generators))


class Sampler:
    """Turns logits into tokens; holds only the optional logits-processor thread pool.

    Contract: ``logits`` has one row per metadata row, float32 (other dtypes are
    converted), and may be modified in place. Seeded rows draw only from their own
    generator, exactly V values per step, so a seeded request samples the same tokens
    whatever its batch mates or position.
    """

    def __init__(
        self,
        logits_processor_threads: int = 0,
        top_k_top_p: TopKTopPSampler | None = None,
        apply_token_bitmask: Callable[..., None] = reference.apply_token_bitmask,
        argmax: Callable[[torch.Tensor], torch.Tensor] = reference.argmax,
    ) -> None:
        # Platform.top_k_top_p_sampler(): a device kernel for unseeded random rows.
        self._top_k_top_p = top_k_top_p
        # The op table's apply_token_bitmask: structured output's masks, in place.
        self._apply_token_bitmask = apply_token_bitmask
        # The op table's argmax: greedy rows' picks ([B, V] float32 -> [B] int64).
        self._argmax = argmax
        # VLLM_LOGITS_PROCESSOR_THREADS, read by the entry point: > 0 runs rows' logits
        # processors concurrently (worth it when they release the GIL).
        self._pool = (
            ThreadPoolExecutor(logits_processor_threads, thread_name_prefix="kvrun-logits")
            if logits_processor_threads > 0
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == md.num_rows, "one logits row per request"
        logits = logits.float()
        raw_logprobs = None
        if md.logprob_rows is not None:
            # Indexing copies, so the in-place stages below cannot touch these values.
            raw_logprobs = torch.log_softmax(logits[md.logprob_rows], dim=1)  # [L, V]
        if md.token_bitmask is not None and md.mask_rows is not None:
            self._apply_token_bitmask(logits, md.token_bitmask, md.mask_rows)
        logits = process_logits(logits, md, self._pool.map if self._pool is not None else None)

        if md.all_greedy:
            sampled = self._argmax(logits)  # [B]
        else:
            assert md.random_rows is not None
            fast = self._top_k_top_p
            if md.greedy_rows is None:
                sampled = _sample_random(logits, md, fast)
            else:
                sampled = self._argmax(logits)
                sampled[md.random_rows] = _sample_random(logits[md.random_rows], md, fast)

        logprobs: list[dict[int, Logprob] | None] = [None] * md.num_rows
        if raw_logprobs is not None and md.logprob_rows is not None:
            rows = md.logprob_rows.tolist()
            nums = [md.num_logprobs[i] or 0 for i in rows]
            dicts = logprob_dicts(raw_logprobs, sampled[md.logprob_rows], nums)
            for i, entry in zip(rows, dicts, strict=True):
                logprobs[i] = entry
        return SamplerOutput(sampled=sampled, token_ids=sampled.tolist(), logprobs=logprobs)
