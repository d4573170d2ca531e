"""Rotary position embedding tables, including the scaled variants."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kvrun.errors import ModelLoadError

__all__ = ["SUPPORTED_ROPE_TYPES", "cos_sin_cache", "inverse_frequencies"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None
) -> torch.Tensor:  # [head_dim/2] float32
    """Per-pair rotation frequencies, computed as Hugging Face does (the oracle)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise ModelLoadError(
        f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_frequencies(inv_freq: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by ``factor``."""
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_cache(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None, max_positions: int
) -> torch.Tensor:  # [max_positions, head_dim]: cos in the first half, sin in the second
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
