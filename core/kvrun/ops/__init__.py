"""Kernels by stable op name.

The core holds a plain-torch reference for every op (:mod:`kvrun.ops.reference`);
a platform overrides the ones it accelerates by returning them from
:meth:`kvrun.Platform.ops`. :class:`OpTable` is the resolved set one model uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from kvrun.errors import PluginError
from kvrun.ops import reference

__all__ = ["OP_NAMES", "OpTable", "reference_ops"]


@dataclass(frozen=True)
class OpTable:
    """One callable per op; signatures and shapes are those of kvrun.ops.reference."""

    prepare_linear: Callable[..., Any]
    linear: Callable[..., Any]
    embedding: Callable[..., Any]
    rms_norm: Callable[..., Any]
    fused_add_rms_norm: Callable[..., Any]
    rotary_embedding: Callable[..., Any]
    silu_and_mul: Callable[..., Any]
    fused_moe: Callable[..., Any]  # a mixture-of-experts MLP (Mixtral, Qwen-MoE)
    prepare_experts: Callable[..., Any]  # at load: one projection's experts, as fused_moe reads
    reshape_and_cache: Callable[..., Any]
    paged_attention: Callable[..., Any]
    awq_dequantize: Callable[..., Any]  # at load, not in the forward: AWQ layers' weights
    apply_token_bitmask: Callable[..., Any]  # in the sampler: structured output's token mask
    argmax: Callable[..., Any]  # in the sampler: greedy rows' token ids
    add_lora: Callable[..., Any]  # LoRA adapters: each token's adapter added to a projection

    def with_overrides(self, overrides: Mapping[str, Callable[..., Any]], source: str) -> OpTable:
        """A copy with some ops replaced; an unknown op name is a PluginError naming ``source``."""
        unknown = sorted(set(overrides) - set(OP_NAMES))
        if unknown:
            raise PluginError(
                f"{source} overrides unknown op(s) {', '.join(unknown)}; "
                f"known ops are: {', '.join(OP_NAMES)}"
            )
        return replace(self, **dict(overrides))


OP_NAMES: tuple[str, ...] = tuple(f.name for f in fields(OpTable))


def reference_ops() -> OpTable:
    return OpTable(**{name: getattr(reference, name) for name in OP_NAMES})
