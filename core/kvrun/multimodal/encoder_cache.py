"""Encoder outputs by content hash, and writing them into a step's input embeddings.

The runner encodes a media item the first time a chunk covers any of its placeholder
rows and keeps the rows in an LRU of ``VLLM_MM_INPUT_CACHE_SIZE`` entries (vLLM's
variable, default 256) keyed by modality and content hash: the later chunks of the same
prompt (chunked prefill), a recompute after preemption and other requests with the same
media reuse them. With a size of 0 nothing is kept and every chunk that covers an item
encodes it again (correct, slower).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from kvrun.multimodal.inputs import MultiModalInputs, MultiModalItem
from kvrun.scheduling.output import ScheduledChunk

__all__ = ["EncoderCache", "multimodal_step_inputs"]

Encode = Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor]


class EncoderCache:
    """LRU of encoder outputs ([length, H] each) keyed by (modality, content hash)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.encoder_runs = 0  # items encoded (cache misses)
        self.hits = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, item: MultiModalItem, encode: Encode) -> torch.Tensor:
        key = (item.modality, item.content_hash)
        rows = self._rows.get(key)
        if rows is not None:
            self._rows.move_to_end(key)
            self.hits += 1
            return rows
        rows = encode(item.modality, item.data)
        self.encoder_runs += 1
        if rows.shape[0] != item.length:
            raise RuntimeError(
                f"the encoder gave {rows.shape[0]} rows for a {item.modality} with "
                f"{item.length} placeholder tokens"
            )
        if self.capacity > 0:
            self._rows[key] = rows
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
        return rows


def multimodal_step_inputs(
    chunks: Sequence[ScheduledChunk],
    positions: torch.Tensor,  # [T] the batch's sequence indices
    cache: EncoderCache,
    encode: Encode,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,  # [T]
    with_embeddings: bool = True,  # False: positions only (a later pipeline stage)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A step's rotary positions and, when a chunk covers media rows, its input embeddings.

    Returns ``([T] positions, None)`` when no chunk covers a media row (every token's
    three M-RoPE components are then equal), else ``([3, T] positions, [T, H] embeddings)``
    with each covered row taken from its item's encoder output (``[T]`` positions for a
    model with ordinary rotary: its media have no M-RoPE positions).
    """
    spans: list[tuple[int, MultiModalInputs, ScheduledChunk]] = []
    row = 0
    covered: list[tuple[int, MultiModalItem, int, int]] = []  # (batch row, item, lo, hi)
    for chunk in chunks:
        mm = chunk.multi_modal
        if mm is not None:
            if mm.mrope_positions is not None:
                spans.append((row, mm, chunk))
            start, end = chunk.start_position, chunk.start_position + chunk.num_tokens
            for item in mm.items:
                lo, hi = max(start, item.offset), min(end, item.end)
                if lo < hi:
                    covered.append((row + lo - start, item, lo - item.offset, hi - item.offset))
        row += chunk.num_tokens
    if not with_embeddings:
        covered = []  # a stage that does not embed encodes nothing
    if not spans:  # ordinary rotary (Qwen2-Audio): only the media rows change
        if not covered:
            return positions, None
        return positions, _embeddings(covered, cache, encode, embed_tokens, input_ids)
    three = positions.view(1, -1).repeat(3, 1)
    for row, mm, chunk in spans:
        prompt_len = mm.mrope_positions.shape[1]  # type: ignore[union-attr]
        rows = mm.positions(chunk.start_position, chunk.num_tokens, prompt_len)
        three[:, row : row + chunk.num_tokens] = rows.to(three.device)
    if not covered:
        # no media row: a chunk inside the prompt still has its three components
        same = bool((three == three[0:1]).all())
        return (three[0].contiguous(), None) if same else (three, None)
    return three, _embeddings(covered, cache, encode, embed_tokens, input_ids)


def _embeddings(
    covered: Sequence[tuple[int, MultiModalItem, int, int]],
    cache: EncoderCache,
    encode: Encode,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
) -> torch.Tensor:
    """The step's token embeddings with each covered media row from its encoder output."""
    embeds = embed_tokens(input_ids).clone()
    for row, item, lo, hi in covered:
        encoded = cache.get(item, encode)
        embeds[row : row + hi - lo] = encoded[lo:hi].to(embeds.dtype)
    return embeds
