"""Which ops run our Triton kernels: all of them, minus VLLM_DISABLED_KERNELS, and AWQ
dequantisation only under VLLM_USE_TRITON_AWQ=1; fused_moe's alignment step in Triton
under VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON=1.

The kernels themselves live in :mod:`kvrun_cuda.triton`; this module only decides
which of them the platform hands the core, so the rule is tested without Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kvrun.ops import OP_NAMES

__all__ = ["select_ops", "triton_kernels"]


def select_ops(
    available: Mapping[str, Callable[..., Any]], disabled: list[str], use_triton_awq: bool = False
) -> tuple[dict[str, Callable[..., Any]], list[str]]:
    """(the ops to override, one note per disabled or unknown name) for the start-up log.

    An op named in ``disabled`` falls back to the core's reference; a name that is no
    op is reported (vLLM also uses the variable for quantisation kernel class names,
    which kvrun has none of), never silently ignored. ``awq_dequantize`` is an opt-in,
    as in vLLM (VLLM_USE_TRITON_AWQ): without it AWQ checkpoints are dequantised on the
    GPU by the reference op (torch), which gives the same weights bit for bit.
    The Triton ``fused_moe`` reads the experts as ``prepare_experts`` stacks them:
    disabling ``prepare_experts`` leaves lists, so ``fused_moe`` runs the reference too.
    """
    chosen = {name: fn for name, fn in available.items() if name not in disabled}
    notes: list[str] = []
    if "prepare_experts" in disabled and "fused_moe" in chosen:
        del chosen["fused_moe"]
        notes.append(
            "VLLM_DISABLED_KERNELS: prepare_experts is disabled, so fused_moe (which reads "
            "the stacked experts) runs the reference op too"
        )
    if "awq_dequantize" in chosen:
        if use_triton_awq:
            notes.append("VLLM_USE_TRITON_AWQ: AWQ checkpoints are dequantised in Triton")
        else:
            del chosen["awq_dequantize"]
    for name in disabled:
        if name in available:
            notes.append(f"VLLM_DISABLED_KERNELS: {name} runs the reference op")
        elif name in OP_NAMES:
            notes.append(f"VLLM_DISABLED_KERNELS: {name} has no kernel here; the reference runs")
        else:
            notes.append(
                f"VLLM_DISABLED_KERNELS: {name!r} names no kernel of this platform; "
                f"known ops: {', '.join(OP_NAMES)}"
            )
    return chosen, notes


def triton_kernels(moe_align_in_triton: bool = False) -> tuple[dict[str, Callable[..., Any]], str]:
    """Our Triton kernels by op name, or none and why (Triton missing or broken);
    ``moe_align_in_triton``: VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON."""
    try:
        from kvrun_cuda.triton.ops import triton_ops
    except ImportError as exc:
        return {}, f"Triton kernels unavailable ({exc}); the reference ops run"
    kernels: dict[str, Callable[..., Any]] = dict(triton_ops(moe_align_in_triton))
    return kernels, f"Triton kernels for {', '.join(sorted(kernels)) or 'no op'}"
