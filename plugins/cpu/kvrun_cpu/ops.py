"""Plain-torch fast paths for the core's ops, same signatures as kvrun.ops.reference.

Each one is kept only because benchmarks/bench_ops.py measures it faster than the
reference on the target CPU (numbers in README.md). None of them writes to its inputs:
callers may reuse what they pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from kvrun.ops import reference
from kvrun_cpu.attention.kernels import decode_attention, prefill_attention
from kvrun_cpu.attention.native import DecodeKernel, decode_batch
from kvrun_cpu.attention.plan import build_plan

__all__ = [
    "cpu_ops",
    "fused_add_rms_norm",
    "linear",
    "paged_attention",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]


# torch builds without oneDNN (rare on x86) keep F.linear.
_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]


def linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N]
    """oneDNN's matmul for float32; F.linear (MKL) otherwise.

    Measured on the AVX-512 CPU of BENCHMARKS.md, 2 threads: SmolLM2's 30 layers of
    projections take 21 ms at one token (F.linear: 35 ms), 23 ms at two (60 ms) and
    86 ms at 64 (101 ms); the 49152 x 576 logits 4.6 / 21 ms at 1 / 64 rows (F.linear:
    9.8 / 34). For bfloat16 F.linear already runs oneDNN.
    """
    if (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.is_contiguous()
        and weight.is_contiguous()
        and _ONEDNN
        # Inside torch.compile Inductor picks its own GEMM (and rejects this op).
        and not torch.compiler.is_compiling()
    ):
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [T, H]
    if weight.dtype != x.dtype:  # the reference promotes; keep its result dtype exactly
        return reference.rms_norm(x, weight, eps)
    # aten's fused kernel: one pass for the variance, one for the scale, no fp32 copy of x.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], x + residual [T, H])
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def _rotate(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, 1, D/2]
    sin: torch.Tensor,  # [T, 1, D/2]
) -> torch.Tensor:
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    # Written straight into the two halves of the result: no torch.cat, no temporaries.
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


def _joint_view(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """q and k as one [T, Hq + Hk, D] view when k directly follows q in memory.

    The model slices both from one fused qkv projection, so each row holds q's heads
    then k's: rotating that view once halves the op count, which is most of the cost
    for the few tokens of a decode step.
    """
    tokens, num_heads, head_dim = query.shape
    row = query.stride(0)
    if (
        key.dtype != query.dtype
        or key.shape[0] != tokens
        or key.shape[2] != head_dim
        or query.stride()[1:] != (head_dim, 1)
        or key.stride()[1:] != (head_dim, 1)
        or (tokens > 1 and key.stride(0) != row)
        or key.untyped_storage().data_ptr() != query.untyped_storage().data_ptr()
        or key.storage_offset() != query.storage_offset() + num_heads * head_dim
    ):
        return None
    return query.as_strided((tokens, num_heads + key.shape[1], head_dim), (row, head_dim, 1))


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hk, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
) -> tuple[torch.Tensor, torch.Tensor]:  # (query, key) rotated, same shapes
    """Rotate-half rotary embedding, as the reference."""
    if query.dtype != key.dtype:
        return reference.rotary_embedding(positions, query, key, cos_sin_cache)
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions)  # [T, D]
    if cos_sin.dtype != query.dtype:
        cos_sin = cos_sin.to(query.dtype)
    cos = cos_sin[:, :half].unsqueeze(1)  # [T, 1, D/2]
    sin = cos_sin[:, half:].unsqueeze(1)
    joint = _joint_view(query, key)
    if joint is None:
        return _rotate(query, cos, sin), _rotate(key, cos, sin)
    out = _rotate(joint, cos, sin)  # [T, Hq + Hk, D]
    num_heads = query.shape[1]
    return out[:, :num_heads], out[:, num_heads:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    out = F.silu(gate)
    return out.mul_(up)  # in place on silu's fresh result: one temporary fewer


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
) -> None:
    """Write each token's key and value into its cache slot, in place (index_copy_)."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    if key.dtype != key_cache.dtype:
        key = key.to(key_cache.dtype)
    if value.dtype != value_cache.dtype:
        value = value.to(value_cache.dtype)
    # Each no-op conversion skipped saves a dispatch: a decode step writes one token.
    rows = num_blocks * block_size
    key_cache.view(rows, num_kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(rows, num_kv_heads, head_dim).index_copy_(0, slots, value)


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]: the new tokens of all requests, flat
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: list[int],  # [B] context length after this step
    query_lens: list[int],  # [B] new tokens per request (they end the context)
    scale: float,
    decode_kernel: DecodeKernel | None = None,  # bound by cpu_ops() when it was built
) -> torch.Tensor:  # [T, Hq, D]
    """Causal paged attention: decodes batched (in the native kernel when given, for
    fp32), prefills one by one on SDPA."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    fp32 = torch.float32
    native = decode_kernel is not None and query.dtype == key_cache.dtype == fp32
    plan = build_plan(query_lens, seq_lens, block_tables, block_size, one_decode_batch=native)
    out = torch.empty_like(query)
    if plan.decode_batch is not None:
        assert decode_kernel is not None
        # The kernel reads [Hk, NB, bs, D] through strides: no copy of the cache.
        k_heads, v_heads = key_cache.permute(2, 0, 1, 3), value_cache.permute(2, 0, 1, 3)
        decode_batch(decode_kernel, query, k_heads, v_heads, plan.decode_batch, scale, out)
    for group in plan.decodes:
        n, width = group.num_seqs, group.num_blocks * block_size
        # [n * blocks, bs, Hk, D] -> [n, Hk, span, D]: a view of the gathered blocks.
        k = key_cache.index_select(0, group.block_ids).view(n, width, num_kv_heads, head_dim)
        v = value_cache.index_select(0, group.block_ids).view(n, width, num_kv_heads, head_dim)
        k, v = k[:, : group.span].transpose(1, 2), v[:, : group.span].transpose(1, 2)
        if isinstance(group.tokens, slice):
            out[group.tokens] = decode_attention(query[group.tokens], k, v, group.mask, scale)
        else:
            q = query.index_select(0, group.tokens)
            out.index_copy_(0, group.tokens, decode_attention(q, k, v, group.mask, scale))
    for seq in plan.prefills:
        k = key_cache.index_select(0, seq.block_ids).view(-1, num_kv_heads, head_dim)
        v = value_cache.index_select(0, seq.block_ids).view(-1, num_kv_heads, head_dim)
        k, v = k[: seq.seq_len].transpose(0, 1), v[: seq.seq_len].transpose(0, 1)
        out[seq.tokens] = prefill_attention(query[seq.tokens], k, v, seq.mask, scale)
    return out


def cpu_ops(decode_kernel: DecodeKernel | None = None) -> Mapping[str, Callable[..., Any]]:
    """The overrides CpuPlatform.ops() returns: every op that measured faster."""
    attention = paged_attention
    if decode_kernel is not None:
        attention = functools.partial(paged_attention, decode_kernel=decode_kernel)
    return {
        "linear": linear,
        "rms_norm": rms_norm,
        "fused_add_rms_norm": fused_add_rms_norm,
        "rotary_embedding": rotary_embedding,
        "silu_and_mul": silu_and_mul,
        "reshape_and_cache": reshape_and_cache,
        "paged_attention": attention,
    }
