"""Plain-torch reference implementations of every kernel, by op name.

These are the oracle: each platform's kernels are tested against them on random
inputs. They favour clarity over speed, but they are also what a platform runs
for any op it does not override, so they must be correct for every shape the
models produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kvrun.quantization import QuantizedMatrix

__all__ = [
    "AWQ_ORDER",
    "add_lora",
    "argmax",
    "awq_dequantize",
    "embedding",
    "fused_add_rms_norm",
    "fused_moe",
    "linear",
    "paged_attention",
    "prepare_experts",
    "prepare_linear",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "unpack_awq",
]


def prepare_linear(weight: torch.Tensor) -> torch.Tensor:  # [N, K] -> what linear reads
    """The form ``linear`` and ``embedding`` read a weight in, made once after loading.

    A platform may return any object (a packed layout, say) as long as its own
    ``linear`` and ``embedding`` take it; the model passes nothing else to them and never
    reads it itself. The reference uses the matrix as it is.
    """
    return weight


def linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K], as prepare_linear returned it
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [T, N]
    """x @ weight.T + bias: every projection and the logits. A GGUF matrix kept quantized
    (:class:`kvrun.quantization.QuantizedMatrix`) is dequantized for the call."""
    if isinstance(weight, QuantizedMatrix):
        return F.linear(x, weight.dequantize().to(x.dtype), bias)
    return F.linear(x, weight, bias)


def embedding(
    ids: torch.Tensor,  # [T] int64
    table: torch.Tensor,  # [V, H], as prepare_linear returned it
) -> torch.Tensor:  # [T, H]
    """Rows ``ids`` of the table: the token embedding (also the tied lm_head's weight).
    A quantized table's rows are dequantized (float32)."""
    if isinstance(table, QuantizedMatrix):
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < table.out_features):
            raise IndexError(f"token ids outside the {table.out_features} rows of the table")
        return table.dequantize(ids)
    return F.embedding(ids, table)


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [T, H]
    dtype = x.dtype
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, H], x + residual [T, H])
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hk, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
) -> tuple[torch.Tensor, torch.Tensor]:  # (query, key) rotated, same shapes
    """Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face Llama) style."""
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions)  # [T, D]
    cos = cos_sin[:, :half].unsqueeze(1)  # [T, 1, D/2]
    sin = cos_sin[:, half:].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_lora(
    y: torch.Tensor,  # [T, N] the projection's output for x (bias included)
    x: torch.Tensor,  # [T, K] the projection's input
    lora_a: torch.Tensor,  # [S, R, K] every slot's A (rows past an adapter's rank are zero)
    lora_b: torch.Tensor,  # [S, N, R] every slot's B
    scales: torch.Tensor,  # [S] float32: each slot's lora_alpha / r
    slots: torch.Tensor,  # [T] int64: each token's slot; -1 = no adapter
) -> torch.Tensor:  # [T, N]: y + scales[s] * (x @ A_s^T) @ B_s^T per token, s its slot
    """Batched LoRA: each token's adapter added to a projection (PEFT's order: the
    low-rank product, then the scale). Tokens with slot -1 keep ``y`` exactly."""
    out = y.clone()
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(slots == slot).squeeze(1)
        xs = x.index_select(0, rows)
        delta = F.linear(F.linear(xs, lora_a[slot]), lora_b[slot]) * scales[slot]
        out.index_copy_(0, rows, out.index_select(0, rows) + delta.to(out.dtype))
    return out


def prepare_experts(
    matrices: Sequence[Any],  # [E] one projection's experts, each as prepare_linear made it
) -> Any:  # what fused_moe reads for that projection
    """The form ``fused_moe`` reads one projection's experts in (every expert's gate-up
    matrices, or every expert's down matrices), made once after loading, from what
    ``prepare_linear`` returned for each.

    A platform whose kernel reads all experts as one ``[E, N, K]`` tensor stacks them
    here, once, instead of on every call. The reference keeps the list. Whatever a
    platform returns, the model hands it only to ``fused_moe``; the reference
    ``fused_moe`` also reads a stacked ``[E, N, K]`` tensor (it indexes experts), so a
    platform whose ``fused_moe`` is disabled still runs on its stacks.
    """
    return list(matrices)


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    w13: Any,  # [E] x [2I, H]: each expert's gate rows then up rows, as prepare_experts made it
    w2: Any,  # [E] x [H, I]: each expert's down projection, as prepare_experts made it
    topk_weights: torch.Tensor,  # [T, K] float32: the router's weight of each chosen expert
    topk_ids: torch.Tensor,  # [T, K] int64: the chosen experts
) -> torch.Tensor:  # [T, H] in hidden's dtype: sum_k weight_k * expert_k(hidden)
    """A mixture-of-experts MLP: each token through its K experts (SiLU-gated, as
    silu_and_mul), weighted. Experts are visited in id order and their outputs added in
    that order (Hugging Face's order), each scaled in float32 then cast to the dtype.
    ``w13`` and ``w2`` are lists of prepare_linear's matrices or ``[E, N, K]`` tensors."""
    out = torch.zeros_like(hidden)
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(w13)).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // k
        x = silu_and_mul(linear(hidden.index_select(0, tokens), w13[expert]))
        y = linear(x, w2[expert])
        weight = topk_weights.reshape(-1).index_select(0, pairs)[:, None]
        out.index_add_(0, tokens, (y * weight).to(out.dtype))
    return out


def reshape_and_cache(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
) -> None:
    """Write each token's key and value into its cache slot, in place."""
    num_blocks, block_size = key_cache.shape[:2]
    key_cache.view(num_blocks * block_size, *key_cache.shape[2:])[slot_mapping] = key.to(
        key_cache.dtype
    )
    value_cache.view(num_blocks * block_size, *value_cache.shape[2:])[slot_mapping] = value.to(
        value_cache.dtype
    )


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]: the new tokens of all requests, flat
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: list[int],  # [B] context length after this step
    query_lens: list[int],  # [B] new tokens per request (they end the context)
    scale: float,
    sliding_window: int | None = None,  # see kvrun.attention.base.AttentionLayerSpec
    logit_softcap: float | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new tokens over its paged context (within the
    sliding window, scores soft-capped, when given).

    Gathers each request's whole context (from the window's first block, with a
    window: entries before it may be ``NULL_BLOCK`` placeholders of released blocks,
    kvrun.scheduling.block_manager), which is what makes it a reference and not a fast
    path.
    """
    block_size = key_cache.shape[1]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    start = 0
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        n_blocks = (seq_len + block_size - 1) // block_size
        # the first key any of these queries sees: (seq_len - q_len) - W + 1, or 0
        first = 0
        if sliding_window is not None:
            first = max(0, seq_len - q_len - sliding_window + 1) // block_size * block_size
        blocks = block_tables[i, first // block_size : n_blocks].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: seq_len - first]  # [S, Hk, D]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[: seq_len - first]
        k = k.repeat_interleave(group, dim=1).float()  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1).float()
        q = query[start : start + q_len].float()  # [Q, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Q, S]
        if logit_softcap is not None:
            scores = torch.tanh(scores / logit_softcap) * logit_softcap
        # query j sits at absolute position seq_len - q_len + j and sees keys 0..that;
        # key s sits at position first + s.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(first, seq_len, device=query.device).unsqueeze(0)
        hidden = k_pos > q_pos
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
        scores = scores.masked_fill(hidden.unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        start += q_len
    return out


# AWQ's packing: nibble n (bits 4n .. 4n + 3) of a word holds column 8 j + AWQ_ORDER[n].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[r, c / 8]`` -> the 4-bit values as int32 ``[r, c]`` in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [r, c/8, 8]: nibble n
    columns = torch.empty_like(nibbles)
    columns[..., list(AWQ_ORDER)] = nibbles  # nibble n is column AWQ_ORDER[n]
    return columns.reshape(packed.shape[0], -1)


def awq_dequantize(
    qweight: torch.Tensor,  # [K, N / 8] int32: eight 4-bit values per word
    qzeros: torch.Tensor,  # [G, N / 8] int32: each group's zero points, packed alike
    scales: torch.Tensor,  # [G, N]: each group's scales (float16 in AWQ files)
    group_size: int,  # input rows per group; -1: one group of all K rows
) -> torch.Tensor:  # [N, K] float32: the weight as linear reads it
    """One AWQ ("GEMM" layout) layer's weight: ``w[n, k] = (q[k, n] - z[g, n]) * s[g, n]``
    with ``g = k // group_size``. Shapes must agree (the loader checks them first)."""
    q = unpack_awq(qweight)
    z = unpack_awq(qzeros)
    rows = q.shape[0]
    group = rows if group_size == -1 else group_size
    index = torch.arange(rows, device=q.device) // group
    weight = (q - z[index]).float() * scales.float()[index]
    return weight.t().contiguous()


def apply_token_bitmask(
    logits: torch.Tensor,  # [B, V] float32, changed in place
    bitmask: torch.Tensor,  # [G, ceil(V / 32)] int32: bit t % 32 of word t // 32 allows token t
    rows: torch.Tensor,  # [G] int64: the logits row each bitmask row applies to
) -> None:
    """Structured output's mask: every token a row's grammar does not allow gets -inf.

    Bits past V are ignored; tokens past the bitmask's width are not allowed. Rows not
    in ``rows`` are left as they are.
    """
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:
        allowed = F.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab].to(logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def argmax(logits: torch.Tensor) -> torch.Tensor:  # [B, V] float32 -> [B] int64
    """Greedy sampling's pick: each row's first maximal index, a NaN counting as the
    largest value (torch.argmax's rule). A platform's version must return the same ids."""
    return logits.argmax(dim=1)
