"""Engine-side state of one pooling request: its prompt's hidden states, pooled as they come.

The scheduler runs a pooling request's prompt like any other (chunked, batched with
generation, preempted and recomputed) and finishes it when the prompt is computed; the
runner returns the final hidden states of each of its chunks and this state keeps only
what the pooling needs (the last row, the first, or a running sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrun.outputs import RequestDelta, RequestMetrics, RequestOutputKind
from kvrun.pooling import PoolerConfig, PoolingParams, finish_embedding

__all__ = ["PoolingState"]


@dataclass
class PoolingState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: PoolingParams
    pooler: PoolerConfig
    metrics: RequestMetrics
    classify: bool = False  # the rows are a classifier's class logits: softmax, not a norm
    _first: torch.Tensor | None = None
    _last: torch.Tensor | None = None
    _sum: torch.Tensor | None = None
    _count: int = 0

    def add_chunk(self, start: int, rows: torch.Tensor) -> None:
        """The final hidden states of prompt positions [start, start + len(rows))."""
        if start == 0:  # the first chunk, or the prompt computed again after preemption
            self._first, self._sum, self._count = None, None, 0
        kind = self.pooler.pooling_type
        if kind == "LAST":
            self._last = rows[-1].float().cpu()
        elif kind == "CLS":
            if start == 0:
                self._first = rows[0].float().cpu()
        else:
            part = rows.float().sum(dim=0).cpu()
            self._sum = part if self._sum is None else self._sum + part
            self._count += rows.shape[0]

    def result(self) -> torch.Tensor:  # [H] or [dimensions] float32
        kind = self.pooler.pooling_type
        if kind == "LAST":
            vector = self._last
        elif kind == "CLS":
            vector = self._first
        else:
            assert self._sum is not None and self._count == len(self.prompt_token_ids)
            vector = self._sum / self._count
        assert vector is not None, f"{self.request_id}: pooled before its prompt ran"
        if self.classify:
            return torch.softmax(vector, dim=-1) if self.params.activation is not False else vector
        normalize = (
            self.pooler.normalize if self.params.normalize is None else self.params.normalize
        )
        return finish_embedding(vector, normalize=normalize, dimensions=self.params.dimensions)

    def final_delta(self, num_cached_tokens: int) -> RequestDelta:
        return RequestDelta(
            request_id=self.request_id,
            num_sequences=0,
            sequences=[],
            finished=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=None,
            num_cached_tokens=num_cached_tokens,
            metrics=self.metrics,
            pooled=self.result(),
        )
