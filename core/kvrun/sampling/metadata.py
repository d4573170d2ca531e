"""What the sampler needs for one step: per-row inputs, and the batch tensors built from them.

The engine describes each row that samples this step with a :class:`SamplingRow` and
calls :func:`build_sampling_metadata` once per step. Every stage no row needs is left
as ``None`` so the sampler skips it; a batch of plain greedy rows builds nothing but
the row count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvrun.sampling_params import SamplingParams
from kvrun.structured_output.compiler import allocate_token_bitmask

__all__ = [
    "SamplingMetadata",
    "SamplingRow",
    "TokenMask",
    "build_sampling_metadata",
    "make_generator",
]


class TokenMask(Protocol):
    """A row's structured-output constraint, as the sampler sees it
    (:class:`kvrun.structured_output.compiler.ConstraintMatcher`)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write row ``row`` of an int32 [G, ceil(V / 32)] bitmask: bit set = allowed."""


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own generator: make it once per request and pass it on every step.

    A seeded row draws only from this generator, so its samples do not depend on which
    other requests share the batch or where the row sits in it.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class SamplingRow:
    """One request that samples a token this step, as the engine knows it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # the whole prompt
    output_token_ids: Sequence[int]  # tokens generated so far (excludes the one sampled now)
    generator: torch.Generator | None = None  # make_generator(params.seed, ...) when seeded
    bad_words_token_ids: Sequence[Sequence[int]] = ()  # params.bad_words, tokenized
    eos_token_ids: Sequence[int] = ()  # the model's EOS ids; masked with stop ids until min_tokens
    token_mask: TokenMask | None = None  # structured output: the grammar's allowed tokens


@dataclass(frozen=True)
class SamplingMetadata:
    """Batch tensors for one sampler step; B rows, V vocab. ``None`` means no row needs it."""

    num_rows: int  # B
    all_greedy: bool  # every row takes the argmax: no temperature, truncation or draws
    random_rows: torch.Tensor | None  # [R] int64 rows that sample; None when all greedy
    greedy_rows: torch.Tensor | None  # [G] int64 rows that take the argmax; None when none
    temperature: torch.Tensor | None  # [R] float32 per random row
    top_k: torch.Tensor | None  # [R] int64 per random row; 0 = keep all
    max_top_k: int  # the largest top_k among random rows (0 when top_k is None)
    top_p: torch.Tensor | None  # [R] float32 per random row; 1.0 = keep all
    min_p: torch.Tensor | None  # [R] float32 per random row; 0.0 = keep all
    generators: dict[int, torch.Generator]  # index into random_rows -> that row's generator
    allowed_rows: torch.Tensor | None  # [A] int64 rows restricted to allowed_token_ids
    allowed_index: tuple[torch.Tensor, torch.Tensor] | None  # ([N] into allowed_rows, [N] token)
    bias_index: tuple[torch.Tensor, torch.Tensor] | None  # ([N] row, [N] token) of logit_bias
    bias_values: torch.Tensor | None  # [N] float32 added at bias_index
    banned_index: tuple[torch.Tensor, torch.Tensor] | None  # ([N] row, [N] token) set to -inf
    processors: list[tuple[int, SamplingRow]]  # (row, input) for rows with logits processors
    mask_rows: torch.Tensor | None  # [G] int64 rows under a structured-output constraint
    token_bitmask: torch.Tensor | None  # [G, ceil(V / 32)] int32, row j for mask_rows[j]
    prompt_ids: torch.Tensor | None  # [B, Lp] int64 padded with V; repetition penalty only
    output_ids: torch.Tensor | None  # [B, Lo] int64 padded with V; any penalty
    repetition_penalty: torch.Tensor | None  # [B] float32; 1.0 = none
    frequency_penalty: torch.Tensor | None  # [B] float32; 0.0 = none
    presence_penalty: torch.Tensor | None  # [B] float32; 0.0 = none
    num_logprobs: list[int | None]  # [B] params.logprobs per row
    logprob_rows: torch.Tensor | None  # [L] int64 rows whose params.logprobs is not None
    max_num_logprobs: int  # the largest params.logprobs among logprob_rows


def _index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, tokens = zip(*pairs, strict=True)
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(tokens, dtype=torch.int64, device=device),
    )


def _padded(seqs: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [list(s) + [pad] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(seqs), width)


def _banned_tokens(row: SamplingRow) -> list[int]:
    """Tokens this row may not sample now: bad-word completions, and stops before min_tokens."""
    out = row.output_token_ids
    banned: list[int] = []
    for word in row.bad_words_token_ids:
        prefix_len = len(word) - 1
        # A multi-token bad word is banned only where the output already spells its prefix.
        if prefix_len == 0 or (
            len(out) >= prefix_len and list(out[len(out) - prefix_len :]) == list(word[:-1])
        ):
            banned.append(word[-1])
    if len(out) < row.params.min_tokens:
        banned.extend(row.params.stop_token_ids or ())
        banned.extend(row.eos_token_ids)
    return banned


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _rows(indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.int64, device=device)


def _token_bitmask(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    masked = [(i, row.token_mask) for i, row in enumerate(rows) if row.token_mask is not None]
    if not masked:
        return None
    bitmask = allocate_token_bitmask(len(masked), vocab_size)
    for j, (_, mask) in enumerate(masked):
        mask.fill_bitmask(bitmask, j)
    return _rows([i for i, _ in masked], device), bitmask.to(device)


def build_sampling_metadata(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> SamplingMetadata:
    """Batch the rows' parameters for one step; ``vocab_size`` is the logits' width."""
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    random = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    rparams = [rows[i].params for i in random]

    top_k = [p.top_k for p in rparams]
    top_p = [p.top_p for p in rparams]
    min_p = [p.min_p for p in rparams]
    generators = {j: g for j, i in enumerate(random) if (g := rows[i].generator) is not None}

    allowed_rows: list[int] = []
    allowed_pairs: list[tuple[int, int]] = []
    bias_pairs: list[tuple[int, int]] = []
    bias_values: list[float] = []
    banned_pairs: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        params = row.params
        if params.allowed_token_ids is not None:
            allowed_pairs.extend((len(allowed_rows), t) for t in params.allowed_token_ids)
            allowed_rows.append(i)
        for token, value in (params.logit_bias or {}).items():
            bias_pairs.append((i, token))
            bias_values.append(value)
        banned_pairs.extend((i, t) for t in _banned_tokens(row))
    assert all(0 <= t < vocab_size for _, t in banned_pairs), "a banned token id outside the vocab"

    rep = [r.params.repetition_penalty for r in rows]
    freq = [r.params.frequency_penalty for r in rows]
    pres = [r.params.presence_penalty for r in rows]
    any_rep = any(x != 1.0 for x in rep)
    any_penalty = any_rep or any(x != 0.0 for x in freq) or any(x != 0.0 for x in pres)

    num_logprobs = [r.params.logprobs for r in rows]
    logprob_rows = [i for i, n in enumerate(num_logprobs) if n is not None]

    token_bitmask = _token_bitmask(rows, vocab_size, device)
    return SamplingMetadata(
        num_rows=len(rows),
        all_greedy=not random,
        random_rows=_rows(random, device) if random else None,
        greedy_rows=_rows(greedy, device) if greedy else None,
        temperature=_floats([p.temperature for p in rparams], device) if random else None,
        top_k=_rows(top_k, device) if any(top_k) else None,
        max_top_k=max(top_k, default=0),
        top_p=_floats(top_p, device) if any(p < 1.0 for p in top_p) else None,
        min_p=_floats(min_p, device) if any(p > 0.0 for p in min_p) else None,
        generators=generators,
        allowed_rows=_rows(allowed_rows, device) if allowed_rows else None,
        allowed_index=_index(allowed_pairs, device) if allowed_pairs else None,
        bias_index=_index(bias_pairs, device) if bias_pairs else None,
        bias_values=_floats(bias_values, device) if bias_values else None,
        banned_index=_index(banned_pairs, device) if banned_pairs else None,
        processors=[(i, r) for i, r in enumerate(rows) if r.params.logits_processors],
        mask_rows=token_bitmask[0] if token_bitmask else None,
        token_bitmask=token_bitmask[1] if token_bitmask else None,
        prompt_ids=(
            _padded([r.prompt_token_ids for r in rows], vocab_size, device) if any_rep else None
        ),
        output_ids=(
            _padded([r.output_token_ids for r in rows], vocab_size, device) if any_penalty else None
        ),
        repetition_penalty=_floats(rep, device) if any_penalty else None,
        frequency_penalty=_floats(freq, device) if any_penalty else None,
        presence_penalty=_floats(pres, device) if any_penalty else None,
        num_logprobs=num_logprobs,
        logprob_rows=_rows(logprob_rows, device) if logprob_rows else None,
        max_num_logprobs=max((n for n in num_logprobs if n is not None), default=0),
    )
