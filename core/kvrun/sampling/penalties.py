"""Logit adjustments that depend on the tokens a request has seen: pure tensor functions.

Repetition penalty follows Hugging Face (divide a positive logit, multiply a negative
one, for every token in prompt or output); frequency and presence penalties follow
OpenAI (subtract per occurrence, and once, over output tokens only).
"""

from __future__ import annotations

import torch

__all__ = ["apply_penalties", "token_counts"]


def token_counts(
    ids: torch.Tensor,  # [B, L] int64, padded with vocab_size
    vocab_size: int,  # V
) -> torch.Tensor:  # [B, V] int64: how often each token occurs in each row
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]  # the extra column soaked up the padding


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float32
    prompt_ids: torch.Tensor | None,  # [B, Lp] int64 padded with V; None: no repetition penalty
    output_ids: torch.Tensor,  # [B, Lo] int64 padded with V
    repetition: torch.Tensor,  # [B] float32, 1.0 = none
    frequency: torch.Tensor,  # [B] float32, 0.0 = none
    presence: torch.Tensor,  # [B] float32, 0.0 = none
) -> torch.Tensor:  # [B, V] float32
    vocab_size = logits.shape[1]
    out_counts = token_counts(output_ids, vocab_size)  # [B, V]
    in_output = out_counts > 0  # [B, V]
    if prompt_ids is not None:
        seen = in_output | (token_counts(prompt_ids, vocab_size) > 0)
        factor = torch.where(seen, repetition[:, None], 1.0)  # [B, V]
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    logits = logits - frequency[:, None] * out_counts
    return logits - presence[:, None] * in_output
