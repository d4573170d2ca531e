"""Rotary position embedding tables, including the scaled variants.

Every variant ends in one table, ``cos_sin_cache``: row ``p`` holds the cos and sin of
position ``p``'s rotation angles (times the variant's attention factor), so the rotary
kernels of every platform are the same whatever the scaling. Frequencies are computed
as Hugging Face computes them (the oracle).

Two variants change their frequencies with the sequence length in Hugging Face, which
recomputes them for each forward from the longest position in it: ``dynamic`` (NTK
scaling past ``max_position_embeddings``) and ``longrope`` (Phi-3's long factors past
``original_max_position_embeddings``). kvrun gives each position the frequencies
Hugging Face uses when that position is the longest of its forward: identical for every
decode step and for every prompt that fits the original context, and independent of
which requests share a batch. Only a prompt prefilled past the original context
differs, whose earlier positions Hugging Face rotates by the whole prompt's length
(vLLM differs more: it applies the fully scaled frequencies at every length).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kvrun.errors import ModelLoadError

__all__ = [
    "POSITION_DEPENDENT_ROPE_TYPES",
    "STATIC_ROPE_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "attention_factor",
    "cos_sin_cache",
    "inverse_frequencies",
    "rope_context_length",
    "rope_type",
]

# One set of frequencies for every position.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Frequencies that depend on the position (see the module docstring).
POSITION_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
SUPPORTED_ROPE_TYPES = STATIC_ROPE_TYPES + POSITION_DEPENDENT_ROPE_TYPES


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The scaling's kind ("default" for None); "su" is longrope's old name."""
    if scaling is None:
        return "default"
    kind = str(scaling.get("rope_type", scaling.get("type", "default")))
    kind = "longrope" if kind == "su" else kind
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope_scaling type {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return kind


def _need(scaling: Mapping[str, Any], key: str, kind: str) -> Any:
    if scaling.get(key) is None:
        raise ModelLoadError(f"rope_scaling of type {kind!r} needs {key!r}")
    return scaling[key]


def _base_frequencies(head_dim: int, theta: float) -> torch.Tensor:  # [D/2]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _original_length(scaling: Mapping[str, Any], max_position_embeddings: int) -> int:
    return int(scaling.get("original_max_position_embeddings") or max_position_embeddings)


def _longrope_factor(scaling: Mapping[str, Any], max_position_embeddings: int) -> float:
    factor = scaling.get("factor")
    if factor is None:
        return max_position_embeddings / _original_length(scaling, max_position_embeddings)
    return float(factor)


def attention_factor(scaling: Mapping[str, Any] | None, max_position_embeddings: int) -> float:
    """The factor yarn and longrope multiply cos and sin by (1.0 for the others)."""
    kind = rope_type(scaling)
    if scaling is None or kind not in ("yarn", "longrope"):
        return 1.0
    given = scaling.get("attention_factor")
    if given is not None:
        return float(given)
    if kind == "longrope":
        factor = _longrope_factor(scaling, max_position_embeddings)
        if factor <= 1.0:
            return 1.0
        original = _original_length(scaling, max_position_embeddings)
        return math.sqrt(1 + math.log(factor) / math.log(original))
    factor = float(_need(scaling, "factor", kind))
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    return _yarn_mscale(factor, 1.0)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None
) -> torch.Tensor:  # [head_dim/2] float32
    """Per-pair rotation frequencies of a static variant (``STATIC_ROPE_TYPES``).

    A position-dependent variant has no single set: use :func:`cos_sin_cache`.
    """
    inv_freq = _base_frequencies(head_dim, theta)
    kind = rope_type(scaling)
    if scaling is None or kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(_need(scaling, "factor", kind))
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling)
    raise ModelLoadError(
        f"rope_scaling type {kind!r} changes its frequencies with the position; "
        f"only {', '.join(STATIC_ROPE_TYPES)} have one set of frequencies"
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


def _yarn_frequencies(head_dim: int, theta: float, s: Mapping[str, Any]) -> torch.Tensor:
    """YaRN: interpolated (slowed by ``factor``) for the low frequencies, extrapolated
    (unchanged) for the high ones, with a linear ramp between ``beta_slow`` and
    ``beta_fast`` rotations over the original context."""
    factor = float(_need(s, "factor", "yarn"))
    original = int(_need(s, "original_max_position_embeddings", "yarn"))
    beta_fast = float(s.get("beta_fast") or 32)
    beta_slow = float(s.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the pair index that turns ``rotations`` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    turns = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated = 1.0 / turns
    interpolated = 1.0 / (factor * turns)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolated * (1 - keep) + extrapolated * keep


def _position_frequencies(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any],
    positions: torch.Tensor,  # [P] int64
    max_position_embeddings: int,
) -> torch.Tensor:  # [P, D/2]: the frequencies position p is rotated with
    kind = rope_type(scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic":
        factor = float(_need(scaling, "factor", kind))
        # float32 throughout, as Hugging Face computes it from a position tensor
        seq_len = (positions + 1).clamp(min=max_position_embeddings).float()
        bases = theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return 1.0 / (bases[:, None] ** exponents[None, :])
    # longrope: the short factors inside the original context, the long ones past it
    original = _original_length(scaling, max_position_embeddings)
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = torch.tensor(_need(scaling, key, kind), dtype=torch.float32)
        if values.shape != (head_dim // 2,):
            raise ModelLoadError(
                f"rope_scaling {key} has {values.numel()} values; head_dim={head_dim} "
                f"needs {head_dim // 2}"
            )
        factors[key] = 1.0 / (values * theta**exponents)
    long = (positions + 1 > original)[:, None]
    return torch.where(long, factors["long_factor"], factors["short_factor"])


def rope_context_length(scaling: Mapping[str, Any] | None, max_position_embeddings: int) -> int:
    """The context the scaling extends the model to, as vLLM derives it: linear, dynamic
    and yarn multiply their base length by ``factor`` (yarn's base is the original
    context); llama3 and longrope configs state the extended length already."""
    kind = rope_type(scaling)
    if scaling is None or kind in ("default", "llama3", "longrope"):
        return max_position_embeddings
    factor = float(_need(scaling, "factor", kind))
    base = max_position_embeddings
    if kind == "yarn":
        base = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    return max(max_position_embeddings, int(base * factor))


def cos_sin_cache(
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None,
    max_positions: int,
    max_position_embeddings: int | None = None,  # the config's; default max_positions
) -> torch.Tensor:  # [max_positions, head_dim]: cos in the first half, sin in the second
    original = max_position_embeddings or max_positions
    positions = torch.arange(max_positions, dtype=torch.int64)
    if rope_type(scaling) in POSITION_DEPENDENT_ROPE_TYPES:
        assert scaling is not None
        inv_freq = _position_frequencies(head_dim, theta, scaling, positions, original)
        freqs = positions.float()[:, None] * inv_freq  # [P, D/2]
    else:
        freqs = torch.outer(positions.float(), inverse_frequencies(head_dim, theta, scaling))
    scale = attention_factor(scaling, original)
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
