"""The cpu plugin's ops, same signatures as kvrun.ops.reference.

Each op runs on the native kernels (:mod:`kvrun_cpu.native`) where they take its
dtype and shapes, else on plain-torch fast paths; each path is kept only because
benchmarks/bench_ops.py measures it faster than the reference on the target CPU
(numbers in README.md). None of them writes to its inputs: callers may reuse what
they pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvrun.ops import reference
from kvrun.quantization import QuantizedMatrix
from kvrun_cpu.attention.kernels import decode_attention, prefill_attention
from kvrun_cpu.attention.native import decode_batch, prefill_batch, runs_natively
from kvrun_cpu.attention.plan import build_plan
from kvrun_cpu.native import NativeKernels, PackedWeight
from kvrun_cpu.native.quantized import (
    QuantizedPackedWeight,
    pack_quantized,
    quantized_linear,
    quantized_rows,
)

__all__ = [
    "add_lora",
    "apply_token_bitmask",
    "argmax",
    "cpu_ops",
    "embedding",
    "fused_add_rms_norm",
    "fused_moe",
    "linear",
    "paged_attention",
    "prepare_linear",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]


# torch builds without oneDNN (rare on x86) keep F.linear.
_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
# The dtypes the native kernels take (elementwise ops and packed matmuls).
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _rowwise(x: torch.Tensor) -> bool:
    """A 2-D tensor whose rows are contiguous (what the native kernels read)."""
    return x.dim() == 2 and x.stride(1) == 1


def prepare_linear(
    weight: torch.Tensor, native: NativeKernels | None = None
) -> torch.Tensor | PackedWeight:  # [N, K] -> what linear and embedding read
    """float32 and bfloat16 matrices packed into the native kernels' 16-row panels
    (faster than oneDNN's at every batch size measured: the cpu README); GGUF blocks kept
    quantized (``quantization="gguf"``) repacked for csrc/quant.c; others as they are."""
    if isinstance(weight, QuantizedMatrix):
        return weight if native is None else pack_quantized(weight)
    if native is None or weight.dtype not in _NATIVE_DTYPES or weight.dim() != 2:
        return weight
    return native.pack(weight)


def linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor | PackedWeight,  # [N, K], as prepare_linear returned it
    bias: torch.Tensor | None = None,  # [N]
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, N]
    """Packed weights on the native kernels; plain float32 on oneDNN's matmul; F.linear
    (oneDNN or MKL) for other dtypes; GGUF blocks on csrc/quant.c (or the reference)."""
    if isinstance(weight, QuantizedPackedWeight):
        assert native is not None  # prepare_linear packs only with the native kernels
        return quantized_linear(native, x, weight, bias)
    if isinstance(weight, QuantizedMatrix):
        return reference.linear(x, weight, bias)
    if isinstance(weight, PackedWeight):
        if (
            native is not None
            and x.dtype == weight.dtype
            and _rowwise(x)
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        ):
            return native.packed_linear(x, weight, bias)
        return F.linear(x, weight.unpack().to(x.dtype), bias)  # what the model never passes
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


def embedding(
    ids: torch.Tensor,  # [T] int64
    table: torch.Tensor | PackedWeight,  # [V, H], as prepare_linear returned it
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, H]
    if isinstance(table, QuantizedPackedWeight):
        assert native is not None
        return quantized_rows(native, ids.to(torch.int64), table)
    if isinstance(table, QuantizedMatrix):
        return reference.embedding(ids, table)
    if isinstance(table, PackedWeight):
        if native is not None and ids.dim() == 1 and ids.dtype == torch.int64:
            return native.packed_rows(ids, table)  # the table's dtype
        return F.embedding(ids, table.unpack())  # what the model never passes
    return F.embedding(ids, table)


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, H]
    if weight.dtype != x.dtype:  # the reference promotes; keep its result dtype exactly
        return reference.rms_norm(x, weight, eps)
    if native is not None and x.dtype in _NATIVE_DTYPES and _rowwise(x):
        return native.rms_norm(x, weight.contiguous(), eps)[0]
    # aten's fused kernel: one pass for the variance, one for the scale, no fp32 copy of x.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    native: NativeKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], x + residual [T, H])
    if (
        native is not None
        and x.dtype in _NATIVE_DTYPES
        and residual.dtype == weight.dtype == x.dtype
        and _rowwise(x)
        and _rowwise(residual)
        and residual.shape == x.shape
    ):
        normed, summed = native.rms_norm(x, weight.contiguous(), eps, residual=residual)
        assert summed is not None
        return normed, summed
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
    native: NativeKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (query, key) rotated, same shapes
    """Rotate-half rotary embedding, as the reference."""
    if query.dtype != key.dtype:
        return reference.rotary_embedding(positions, query, key, cos_sin_cache)
    if (
        native is not None
        and query.dtype in _NATIVE_DTYPES
        and cos_sin_cache.dtype == torch.float32
        and cos_sin_cache.is_contiguous()
        and query.stride(2) == 1
        and key.stride(2) == 1
        and positions.dtype == torch.int64
        and positions.is_contiguous()
        and positions.numel() == query.shape[0]
    ):
        out = native.rotary(positions, query, key, cos_sin_cache)  # [T, Hq + Hk, D]
        num_heads = query.shape[1]
        return out[:, :num_heads], out[:, num_heads:]
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


def silu_and_mul(
    x: torch.Tensor, native: NativeKernels | None = None
) -> torch.Tensor:  # [T, 2I] -> [T, I]
    if native is not None and x.dtype in _NATIVE_DTYPES and _rowwise(x):
        return native.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    out = F.silu(gate)
    return out.mul_(up)  # in place on silu's fresh result: one temporary fewer


def apply_token_bitmask(
    logits: torch.Tensor,  # [B, V] float32, changed in place
    bitmask: torch.Tensor,  # [G, ceil(V / 32)] int32
    rows: torch.Tensor,  # [G] int64
    native: NativeKernels | None = None,
) -> None:
    """Structured output's mask, one pass over each masked row (the reference unpacks
    every bit into a [G, V] tensor first)."""
    if (
        native is not None
        and logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.stride(1) == 1
    ):
        native.apply_token_bitmask(logits, bitmask.to(torch.int32).contiguous(), rows)
        return
    reference.apply_token_bitmask(logits, bitmask, rows)


def argmax(
    logits: torch.Tensor,  # [B, V] float32
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [B] int64
    """Greedy picks in one vectorized pass per row, the rows split among the threads
    (torch's argmax over 64 x 49152 logits took ~9 ms, longer than the lm_head)."""
    if (
        native is not None
        and logits.dtype == torch.float32
        and logits.device.type == "cpu"
        and logits.dim() == 2
        and logits.shape[1] > 0
        and logits.stride(1) == 1
    ):
        return native.argmax(logits)
    return reference.argmax(logits)


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
    native: NativeKernels | None = None,
) -> None:
    """Write each token's key and value into its cache slot, in place: natively, or by
    index_copy_."""
    if (
        native is not None
        and key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
        and key.stride(2) == 1
        and value.stride(2) == 1
        and key_cache.stride() == value_cache.stride()
        and key_cache.stride(3) == 1
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
    ):
        # The kernel takes the head-major view [Hk, NB, bs, D] through strides.
        k_heads, v_heads = key_cache.permute(2, 0, 1, 3), value_cache.permute(2, 0, 1, 3)
        native.write_kv(key, value, k_heads, v_heads, slot_mapping)
        return
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
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal paged attention: decodes and prefills each in one native call when the
    kernels are given (chunk-invariant), else decodes batched and prefills on SDPA."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    in_c = runs_natively(native, query, key_cache) and key_cache.dtype == value_cache.dtype
    plan = build_plan(
        query_lens,
        seq_lens,
        block_tables,
        block_size,
        one_decode_batch=in_c,
        one_prefill_batch=in_c,
    )
    out = torch.empty_like(query)
    if plan.decode_batch is not None:
        assert native is not None
        # The kernel reads [Hk, NB, bs, D] through strides: no copy of the cache.
        k_heads, v_heads = key_cache.permute(2, 0, 1, 3), value_cache.permute(2, 0, 1, 3)
        decode_batch(native, query, k_heads, v_heads, plan.decode_batch, scale, out)
    if plan.prefill_batch is not None:
        assert native is not None
        k_heads, v_heads = key_cache.permute(2, 0, 1, 3), value_cache.permute(2, 0, 1, 3)
        prefill_batch(native, query, k_heads, v_heads, plan.prefill_batch, scale, out)
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


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    w13: Sequence[Any],  # [E] x [2I, H], as prepare_linear made them
    w2: Sequence[Any],  # [E] x [H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int64
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, H]
    """The (token, expert) pairs sorted by expert, then two grouped native matmuls (each
    expert's packed matrix read once for all its tokens, one call for all experts) with
    the native SiLU between; outputs added per token in expert order, as the reference
    adds them. Without packed weights (no native kernels, float16): the reference."""
    packed = native is not None and all(isinstance(w, PackedWeight) for w in (*w13, *w2))
    if not packed or hidden.dtype != w13[0].dtype:
        return reference.fused_moe(hidden, w13, w2, topk_weights, topk_ids)
    assert native is not None
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(len(w13) + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(flat, minlength=len(w13)), 0, out=offsets[1:])
    tokens = order // k
    rows = hidden.index_select(0, tokens)  # [T * K, H], grouped by expert
    gate_up = native.grouped_linear(rows, offsets, w13)
    down = native.grouped_linear(native.silu_and_mul(gate_up), offsets, w2)
    weighted = down * topk_weights.reshape(-1).index_select(0, order)[:, None]
    return torch.zeros_like(hidden).index_add_(0, tokens, weighted.to(hidden.dtype))


def add_lora(
    y: torch.Tensor,  # [T, N]
    x: torch.Tensor,  # [T, K]
    lora_a: torch.Tensor,  # [S, R, K]
    lora_b: torch.Tensor,  # [S, N, R]
    scales: torch.Tensor,  # [S] float32
    slots: torch.Tensor,  # [T] int64, -1 = no adapter
    native: NativeKernels | None = None,
) -> torch.Tensor:  # [T, N]
    """Batched LoRA in one native call (csrc/lora.c: tokens grouped by slot, then the
    shrink and the expansion over the thread pool); the reference's loop over slots
    otherwise."""
    if (
        native is not None
        and y.dtype in _NATIVE_DTYPES
        and x.dtype == lora_a.dtype == lora_b.dtype == y.dtype
        and _rowwise(y)
        and _rowwise(x)
        and lora_a.is_contiguous()
        and lora_b.is_contiguous()
        and scales.dtype == torch.float32
        and slots.dtype == torch.int64
    ):
        return native.add_lora(y, x, lora_a, lora_b, scales.contiguous(), slots.contiguous())
    return reference.add_lora(y, x, lora_a, lora_b, scales, slots)


_OPS: dict[str, Callable[..., Any]] = {
    "prepare_linear": prepare_linear,
    "linear": linear,
    "embedding": embedding,
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "fused_moe": fused_moe,
    "reshape_and_cache": reshape_and_cache,
    "paged_attention": paged_attention,
    "apply_token_bitmask": apply_token_bitmask,
    "argmax": argmax,
    "add_lora": add_lora,
}


def cpu_ops(native: NativeKernels | None = None) -> Mapping[str, Callable[..., Any]]:
    """The overrides CpuPlatform.ops() returns: every op that measured faster, bound to
    the native kernels when they were built."""
    if native is None:
        return dict(_OPS)
    return {name: functools.partial(op, native=native) for name, op in _OPS.items()}
