"""A request's processed media: what the scheduler carries and the runner consumes.

:mod:`kvrun.multimodal.processing` builds a :class:`MultiModalInputs` for a prompt with
media: the prompt's token ids with each item's placeholder run expanded, each item's
encoder inputs and content hash, and the prompt's multimodal rotary positions (M-RoPE).
The request carries it unchanged from ``LLMEngine.add_request`` to every chunk the
scheduler cuts from it; the runner encodes an item once (an LRU keyed by its content
hash) and writes the rows a chunk covers into the input embeddings.

Invariants: items are in prompt order and do not overlap; item ``i`` occupies prompt
positions ``[offset, offset + length)``, all of them its placeholder token; ``length``
equals the rows its encoder output has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["MultiModalInputs", "MultiModalItem"]


@dataclass(frozen=True, eq=False)
class MultiModalItem:
    """One image or video of a prompt, ready for the model's encoder."""

    modality: str  # "image" or "video"
    # sha256 (hex) of the decoded media and the settings that processed it: equal hashes
    # give equal encoder outputs, so the runner's encoder cache and prefix caching key on it
    content_hash: str
    offset: int  # prompt index of the item's first placeholder token
    length: int  # placeholder tokens = rows of the encoder output
    # the encoder's inputs (Qwen2-VL: pixel_values [N, C * tps * ps * ps] and grid_thw [3])
    data: Mapping[str, torch.Tensor]

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, eq=False)
class MultiModalInputs:
    """A prompt's media items and its M-RoPE positions."""

    items: tuple[MultiModalItem, ...]
    # [3, prompt_len] int64 (t, h, w) rotary positions of the prompt's tokens; None for a
    # model with ordinary rotary
    mrope_positions: torch.Tensor | None = None
    # a token at sequence index p >= prompt_len rotates at p + mrope_delta on all three
    # components (the media compress positions: the delta is <= 0)
    mrope_delta: int = 0

    @property
    def cache_salt(self) -> bytes:
        """The prefix-cache salt of the media: a prompt with the same tokens and other
        media (or the same media elsewhere) never shares KV blocks with this one."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(
                f"{item.modality}:{item.content_hash}@{item.offset}+{item.length};".encode()
            )
        return b"mm:" + digest.digest()

    def positions(self, start: int, count: int, prompt_len: int) -> torch.Tensor:
        """[3, count] rotary positions of sequence indices ``start .. start + count``."""
        assert self.mrope_positions is not None
        end = start + count
        parts = []
        if start < prompt_len:
            parts.append(self.mrope_positions[:, start : min(end, prompt_len)])
        if end > prompt_len:
            tail = torch.arange(max(start, prompt_len), end, dtype=torch.int64)
            parts.append((tail + self.mrope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
