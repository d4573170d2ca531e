"""The decoder layout a platform's fused decode step may read directly.

A platform's :meth:`~kvrun.platforms.Platform.fused_decoder` (the cpu plugin's native
decode step) does not call the model: it reads the model's weights and tables and runs
the whole step itself. That is only right for a model whose arithmetic is exactly the
one described here, so a model class opts in by declaring ``decoder_layout =
DECODER_LAYOUT`` and keeping the attributes of :class:`DecoderLayout`; a fused decoder
checks the declaration with :func:`layout_mismatch` and otherwise logs why the model
runs op by op.

The layout (``DECODER_LAYOUT``, version 2), per layer, on hidden state ``x`` [T, H]:

- ``h = rms_norm(x, input_norm, eps)``; ``qkv = linear(h, qkv) (+ qkv_bias)``, the
  rows being q [Hq*D], k [Hk*D], v [Hk*D] in that order;
- where ``q_norm``/``k_norm`` are not None (Qwen3), each q head and each k head is
  ``rms_norm(head, q_norm / k_norm, eps)`` (new in version 2);
- rotary embedding (rotate-half, "neox" style) of q and k from ``cos_sin``
  [max_positions, D] float32, cos in the first D/2 columns and sin in the last;
- causal attention over the paged cache with scale ``attention.spec.scale``, no
  soft-capping, no sliding window;
- ``x = x + linear(attn, o)``; ``h = rms_norm(x, post_norm, eps)``;
  ``x = x + linear(silu(gate) * up, down)`` with ``gate_up`` rows gate [I] then up [I];
- after the last layer ``rms_norm(x, norm, eps)``; the embedding is ``embed`` (unscaled),
  the logits ``linear(x, lm_head)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from kvrun.attention.base import AttentionBackend
from kvrun.models.config import ModelConfig

__all__ = ["DECODER_LAYOUT", "DecoderLayerLayout", "DecoderLayout", "layout_mismatch"]

DECODER_LAYOUT = "kvrun-decoder-v2"


class DecoderLayerLayout(Protocol):
    """One layer's weights: matrices as the platform's ``prepare_linear`` returned them."""

    input_norm: torch.Tensor  # [H]
    qkv: Any  # [(Hq + 2 Hk) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D] or None
    o: Any  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_up: Any  # [2 I, H]
    down: Any  # [H, I]
    q_norm: torch.Tensor | None  # [D] per-head norm of q, or None
    k_norm: torch.Tensor | None  # [D] per-head norm of k, or None


class DecoderLayout(Protocol):
    """What a fused decoder reads from a model that declares ``DECODER_LAYOUT``."""

    decoder_layout: str  # DECODER_LAYOUT
    config: ModelConfig  # num_layers, hidden_size, heads, head_dim, intermediate, rms_norm_eps
    dtype: torch.dtype
    attention: AttentionBackend  # its spec.scale; its cache layout
    embed: Any  # [V, H]
    layers: Sequence[DecoderLayerLayout]
    norm: torch.Tensor  # [H]
    lm_head: Any  # [V, H]; the same object as embed when tied
    cos_sin: torch.Tensor  # [max_positions, D] float32


_LAYER_FIELDS = (
    "input_norm",
    "qkv",
    "qkv_bias",
    "o",
    "post_norm",
    "gate_up",
    "down",
    "q_norm",
    "k_norm",
)
_MODEL_FIELDS = ("config", "dtype", "attention", "embed", "layers", "norm", "lm_head", "cos_sin")


def layout_mismatch(model: object) -> str | None:
    """Why ``model`` cannot be read as :class:`DecoderLayout` (None: it can)."""
    name = type(model).__name__
    declared = getattr(type(model), "decoder_layout", None)
    if declared != DECODER_LAYOUT:
        return (
            f"{name} does not declare kvrun's fused-decoder layout {DECODER_LAYOUT} "
            f"(it declares {declared!r})"
        )
    missing = [f for f in _MODEL_FIELDS if not hasattr(model, f)]
    layers = getattr(model, "layers", [])
    missing += sorted(
        {f"layers[].{f}" for lay in layers for f in _LAYER_FIELDS if not hasattr(lay, f)}
    )
    if missing:
        return f"{name} declares {DECODER_LAYOUT} but lacks {', '.join(missing)}"
    asked = sorted(model.attention.spec.features)  # type: ignore[attr-defined]
    if asked:  # e.g. Mistral's sliding window: the layout's attention is plain causal
        return f"{name}'s attention asks for {', '.join(asked)}, outside {DECODER_LAYOUT}"
    return None
