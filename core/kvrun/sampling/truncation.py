"""From logits to a token: temperature, top-k, top-p, min-p, then a draw. Pure functions.

Rows here are the random rows only (R of them); greedy rows never reach this module.
Removed tokens get logit -inf or probability 0; nothing is renormalised because the
draw (an exponential race) is invariant to scaling a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "TopKTopPSampler",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "exponential_noise",
    "sample_from",
]

# A platform's top-k/top-p sampling kernel (Platform.top_k_top_p_sampler), used instead
# of the torch path for batches with no seeded row and no min_p (a kernel's own random
# stream cannot keep a seeded request's draws independent of its batch mates):
# (logits [R, V] float32 already divided by temperature, top_k [R] int64 with 0 = keep
# all, top_p [R] float32 with 1.0 = keep all) -> [R] int64 sampled token ids.
TopKTopPSampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def apply_top_k(
    logits: torch.Tensor,  # [R, V] float32
    top_k: torch.Tensor,  # [R] int64, 0 = keep all
    max_top_k: int,  # max(top_k), known on the host so no device sync is needed
) -> torch.Tensor:  # [R, V]: logits below each row's k-th largest set to -inf
    k = min(max_top_k, logits.shape[1])
    top = logits.topk(k, dim=1).values  # [R, k] sorted descending
    kth = top.gather(1, (top_k.clamp(1, k) - 1)[:, None])  # [R, 1]
    kth = torch.where(top_k[:, None] > 0, kth, float("-inf"))
    # Ties with the k-th value survive: the kept set can exceed k only on exact ties.
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(
    probs: torch.Tensor,  # [R, V] float32, softmax of the logits so far
    top_p: torch.Tensor,  # [R] float32 in (0, 1], 1.0 = keep all
) -> torch.Tensor:  # [R, V]: tokens outside the smallest set reaching top_p set to 0
    sorted_probs, order = probs.sort(dim=1, descending=True)  # [R, V]
    mass_before = sorted_probs.cumsum(dim=1) - sorted_probs  # [R, V], 0 for the first
    p = top_p[:, None]
    # p == 1 keeps all outright: rounding can push the running sum to 1 before the tail.
    drop_sorted = (mass_before >= p) & (p < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def apply_min_p(
    probs: torch.Tensor,  # [R, V] float32
    min_p: torch.Tensor,  # [R] float32 in [0, 1], 0.0 = keep all
) -> torch.Tensor:  # [R, V]: tokens below min_p times the row's top probability set to 0
    threshold = probs.amax(dim=1, keepdim=True) * min_p[:, None]  # [R, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_noise(
    like: torch.Tensor,  # [R, V]
    generators: dict[int, torch.Generator],  # row -> the row's own generator
) -> torch.Tensor:  # [R, V] float32, Exponential(1)
    q = torch.empty_like(like)
    if len(generators) < like.shape[0]:
        q.exponential_()  # rows without a generator share the default one
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)  # exactly V draws per step, whatever the batch
    # An exact 0 would turn p/q into inf (or nan where p == 0); the smallest normal is harmless.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def sample_from(
    probs: torch.Tensor,  # [R, V] float32, unnormalised, 0 = impossible
    noise: torch.Tensor,  # [R, V] Exponential(1)
) -> torch.Tensor:  # [R] int64
    # Exponential race: argmax(p_i / q_i) picks i with probability p_i / sum(p).
    return (probs / noise).argmax(dim=1)
