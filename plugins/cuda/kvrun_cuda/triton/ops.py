"""The Triton kernels by op name: what the CUDA and ROCm platforms return from ops().

Every op keeps the signature of its twin in :mod:`kvrun.ops.reference`. The
caches the KV ops take are the reference layout, ``[num_blocks, block_size, Hk, D]``
per key or value half, which is also what :class:`~kvrun_cuda.triton.attention.
TritonAttention` allocates (as ``[2, ...]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from kvrun_cuda.triton.awq import awq_dequantize
from kvrun_cuda.triton.elementwise import (
    fused_add_rms_norm,
    reshape_and_cache,
    rms_norm,
    rotary_embedding,
    silu_and_mul,
)
from kvrun_cuda.triton.fused_moe import fused_moe, prepare_experts
from kvrun_cuda.triton.lora import add_lora
from kvrun_cuda.triton.paged_attention import unified_attention

__all__ = ["TRITON_OP_NAMES", "paged_attention", "triton_ops"]


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]: the new tokens of all requests, flat
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: list[int],  # [B] context length after this step
    query_lens: list[int],  # [B] new tokens per request (they end the context)
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """The reference op's signature over the Triton kernel.

    The host lists are copied to the device on each call; the attention backend
    passes the metadata's device tensors straight to the kernel instead.
    """
    device = query.device
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return unified_attention(
        query,
        key_cache,
        value_cache,
        block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        max(query_lens, default=0),
        scale,
    )


def triton_ops(moe_align_in_triton: bool = False) -> dict[str, Callable[..., Any]]:
    """Op name -> Triton kernel wrapper, for Platform.ops(). ``moe_align_in_triton``
    (VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON): fused_moe sorts its tokens by expert in
    Triton rather than in torch ops."""
    return {
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "rotary_embedding": rotary_embedding,
        "silu_and_mul": silu_and_mul,
        "fused_moe": functools.partial(fused_moe, align_in_triton=moe_align_in_triton),
        "prepare_experts": prepare_experts,
        "reshape_and_cache": reshape_and_cache,
        "paged_attention": paged_attention,
        "awq_dequantize": awq_dequantize,
        "add_lora": add_lora,
    }


TRITON_OP_NAMES: tuple[str, ...] = tuple(triton_ops())
