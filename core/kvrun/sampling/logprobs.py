"""Log-probabilities under the model's raw distribution: the chosen token's and the top N.

Computed from log_softmax of the unprocessed logits (vLLM v1's default): penalties,
temperature and truncation change what is sampled, not what is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrun.outputs import Logprob

__all__ = ["gather_logprobs", "logprob_dicts", "prompt_logprobs"]


def gather_logprobs(
    logprobs: torch.Tensor,  # [N, V] float32 log_softmax
    token_ids: torch.Tensor,  # [N] int64 the token chosen (or given) at each row
    num: int,  # how many top candidates to return, >= 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token logprob [N], token rank [N], top ids [N, num], top logprobs [N, num])."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    # Rank 1 is the most likely; tokens tied with the chosen one share its rank.
    ranks = (logprobs > chosen).sum(dim=1) + 1  # [N]
    top_values, top_ids = logprobs.topk(min(num, logprobs.shape[1]), dim=1)  # [N, num]
    return chosen.squeeze(1), ranks, top_ids, top_values


def logprob_dicts(
    logprobs: torch.Tensor,  # [N, V] float32 log_softmax
    token_ids: torch.Tensor,  # [N] int64
    nums: Sequence[int],  # [N] top candidates wanted per row
) -> list[dict[int, Logprob]]:
    """One dict per row: the chosen token first, then the top nums[i] by rank."""
    chosen, ranks, top_ids, top_values = gather_logprobs(logprobs, token_ids, max(nums, default=0))
    out: list[dict[int, Logprob]] = []
    rows = zip(
        token_ids.tolist(),
        chosen.tolist(),
        ranks.tolist(),
        top_ids.tolist(),
        top_values.tolist(),
        nums,
        strict=True,
    )
    for token, value, rank, ids, values, num in rows:
        entry = {token: Logprob(logprob=value, rank=rank)}
        for position, (candidate, candidate_value) in enumerate(
            zip(ids[:num], values[:num], strict=True)
        ):
            entry.setdefault(candidate, Logprob(logprob=candidate_value, rank=position + 1))
        out.append(entry)
    return out


def prompt_logprobs(
    logits: torch.Tensor,  # [P, V] raw logits; row i predicts prompt token i + 1
    prompt_token_ids: Sequence[int],  # [P] (a trailing logits row beyond P - 1 is ignored)
    num: int,  # top candidates per position, >= 0
) -> list[dict[int, Logprob] | None]:
    """One entry per prompt token; entry 0 is None because nothing predicts the first token.

    For a chunked prefill, call :func:`logprob_dicts` on the chunk's rows with the
    following prompt tokens as targets and append.
    """
    count = len(prompt_token_ids) - 1
    assert logits.shape[0] >= count, "need one logits row per prompt token after the first"
    result: list[dict[int, Logprob] | None] = [None]
    if count <= 0:
        return result if prompt_token_ids else []
    raw = torch.log_softmax(logits[:count].float(), dim=1)  # [P-1, V]
    targets = torch.tensor(prompt_token_ids[1:], dtype=torch.int64, device=logits.device)
    result.extend(logprob_dicts(raw, targets, [num] * count))
    return result
