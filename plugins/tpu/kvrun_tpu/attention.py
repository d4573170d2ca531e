"""Paged attention in plain XLA-friendly torch ops: gather by block table, masked softmax.

Every tensor here has a shape fixed by the step's bucket (see :mod:`kvrun_tpu.buckets`),
so one compiled graph serves every batch of that bucket: no Python loop over requests,
no host lists, no data-dependent shapes. The price is work proportional to the padded
context of every token; on a real TPU the Pallas kernel avoids it (see README).

Cache layout, one tensor per layer: ``[num_blocks + 1, block_size, 2 * Hk, D]`` with
keys at the even and values at the odd combined heads: the layout of torch_xla's Pallas
``ragged_paged_attention``, so on a TPU the kernel reads the same cache (the tests check
this layout against that op's non-kernel path). The extra block at the end is a write
sink for the padding tokens of a bucket: the block manager never hands it out, so
padding never overwrites a real request's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata

__all__ = [
    "PallasPagedAttention",
    "XlaAttentionMetadata",
    "XlaPagedAttention",
    "gather_context",
    "masked_attention",
    "write_kv",
]


@dataclass
class XlaAttentionMetadata(AttentionMetadata):
    """The core's metadata plus the padded per-token views the XLA graph needs.

    ``slot_mapping`` has the padded T (padding -> sink slots), ``block_tables`` the padded
    B rows and ``max_blocks_per_seq`` columns; host fields describe the real batch.
    """

    token_seq: torch.Tensor  # [Tp] int64: block-table row of each token (padding -> 0)
    token_pos: torch.Tensor  # [Tp] int64: absolute position of each token (padding -> 0)
    num_seqs_device: torch.Tensor  # [1] int32: real requests (the Pallas kernel reads it)


def write_kv(
    kv_cache: torch.Tensor,  # [P, bs, 2 Hk, D]
    key: torch.Tensor,  # [Tp, Hk, D]
    value: torch.Tensor,  # [Tp, Hk, D]
    slot_mapping: torch.Tensor,  # [Tp] int64 flat slots
) -> None:
    """Store each token's key and value, interleaved per kv head, in place."""
    tp, hk, d = key.shape
    combined = torch.stack((key, value), dim=2).view(tp, 2 * hk, d)  # k0 v0 k1 v1 ...
    flat = kv_cache.view(-1, 2 * hk, d)  # [P * bs, 2 Hk, D]
    flat.index_copy_(0, slot_mapping, combined.to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor,  # [P, bs, 2 Hk, D]
    block_tables: torch.Tensor,  # [Bp, M] int32 block ids
) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values: [Bp, M * bs, Hk, D] in position order
    pages = kv_cache.index_select(0, block_tables.reshape(-1).long())  # [Bp * M, bs, 2 Hk, D]
    context = pages.view(block_tables.shape[0], -1, *kv_cache.shape[2:])  # [Bp, C, 2 Hk, D]
    return context[:, :, 0::2], context[:, :, 1::2]


def masked_attention(
    query: torch.Tensor,  # [Tp, Hq, D]
    keys: torch.Tensor,  # [Bp, C, Hk, D] context of each row
    values: torch.Tensor,  # [Bp, C, Hk, D]
    token_seq: torch.Tensor,  # [Tp] int64 row of each token
    token_pos: torch.Tensor,  # [Tp] int64 position of each token
    scale: float,
) -> torch.Tensor:  # [Tp, Hq, D]
    """Causal attention of each token over its row's context (positions 0..its own)."""
    tp, hq, d = query.shape
    hk = keys.shape[2]
    group = hq // hk
    k = keys.index_select(0, token_seq).float()  # [Tp, C, Hk, D]
    v = values.index_select(0, token_seq).float()
    q = query.float().view(tp, hk, group, d)  # query head h reads kv head h // group
    scores = torch.einsum("tkgd,tckd->tkgc", q, k) * scale  # [Tp, Hk, G, C]
    context = torch.arange(k.shape[1], device=query.device)  # [C]
    # Position 0 is always visible, so padding tokens (position 0) never softmax an empty row.
    hidden = context.unsqueeze(0) > token_pos.unsqueeze(1)  # [Tp, C]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("tkgc,tckd->tkgd", probs, v)  # [Tp, Hk, G, D]
    return out.reshape(tp, hq, d).to(query.dtype)


class XlaPagedAttention(AttentionBackend):
    """The tpu platform's attention: writes K/V at the slots, then gathers and masks."""

    name = "XLA_PAGED"

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_blocks + 1, block_size, 2 * num_kv_heads, head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert isinstance(meta, XlaAttentionMetadata), (
            f"XLA_PAGED needs the tpu runner's padded metadata, got {type(meta).__name__}"
        )
        write_kv(kv_cache, key, value, meta.slot_mapping)
        keys, values = gather_context(kv_cache, meta.block_tables)
        return masked_attention(
            query, keys, values, meta.token_seq, meta.token_pos, self.spec.scale
        )


class PallasPagedAttention(XlaPagedAttention):
    """The Pallas ragged paged-attention kernel: needs a real TPU and jax (unverified here).

    Same cache layout and padded metadata as XLA_PAGED; only the attention math moves
    into the kernel, which skips the padded context that the plain ops compute.
    """

    name = "PALLAS"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        from torch_xla.experimental.custom_kernel import ragged_paged_attention

        assert isinstance(meta, XlaAttentionMetadata), (
            f"PALLAS needs the tpu runner's padded metadata, got {type(meta).__name__}"
        )
        write_kv(kv_cache, key, value, meta.slot_mapping)
        out: torch.Tensor = ragged_paged_attention(
            query,
            kv_cache,
            meta.seq_lens,
            meta.block_tables,
            meta.query_start_loc,
            meta.num_seqs_device,
            sm_scale=self.spec.scale,
        )
        return out
