"""Flat paged attention for decode, as Gaudi runs it, in plain torch ops.

Gaudi has no per-sequence paged-attention kernel; flat paged attention is written in
dense ops its graph compiler handles well: batch->block and block->batch are matmuls
with the one-hot ``block_mapping``, the cache is read with one gather (or one slice,
under contiguous PA), and the softmax is split across blocks. The same code runs on
the CPU, which is how it is tested against the core's reference attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.ops import reference
from kvrun_hpu.buckets import BucketRange
from kvrun_hpu.decode_metadata import HpuDecodeMetadata, build_decode_metadata

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "DEFAULT_BLOCK_BUCKETS",
    "HpuFlatAttention",
    "flat_paged_attention",
]

# Decode batch sizes 1, 2, 4, ..., 32, 64, ..., 256, as vLLM's HPU defaults.
DEFAULT_BATCH_BUCKETS = BucketRange(min=1, step=32, max=256)
# Block-list lengths in steps of 128 blocks.
DEFAULT_BLOCK_BUCKETS = BucketRange(min=128, step=128, max=4096)


def flat_paged_attention(
    query: torch.Tensor,  # [B, Hq, D]: one decode token per batch row (padded rows allowed)
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    meta: HpuDecodeMetadata,
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]; padded rows are 0
    """Each row's query attends to its sequence's blocks; the softmax spans blocks exactly."""
    batch, num_heads, head_dim = query.shape
    num_entries, block_size = meta.block_bias.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    mapping = meta.block_mapping.to(query.dtype)  # [NB, B]
    assert mapping.shape == (num_entries, batch), (mapping.shape, num_entries, batch)
    # batch -> block: every entry gets its sequence's query.
    q = (mapping @ (query * scale).reshape(batch, -1)).view(
        num_entries, num_kv_heads, group, head_dim
    )
    if meta.contiguous:
        keys, values = key_cache[:num_entries], value_cache[:num_entries]  # one slice
    else:
        keys = key_cache.index_select(0, meta.block_list)
        values = value_cache.index_select(0, meta.block_list)
    # Zero what no query may see (slots past a block's usage, padding entries): the bias
    # masks their scores, but 0 * NaN from a never-written slot would still poison sums.
    visible = (meta.block_bias == 0) & (meta.block_groups >= 0).unsqueeze(1)  # [NB, bs]
    hidden = ~visible.view(num_entries, block_size, 1, 1)
    keys, values = keys.masked_fill(hidden, 0), values.masked_fill(hidden, 0)
    keys = keys.permute(0, 2, 3, 1)  # [NB, Hk, D, bs]
    values = values.permute(0, 2, 1, 3)  # [NB, Hk, bs, D]
    scores = torch.matmul(q, keys.to(q.dtype)).float()  # [NB, Hk, G, bs]
    scores = scores + meta.block_bias.float().view(num_entries, 1, 1, block_size)
    # Subtract each sequence's own maximum, so no block's exp over- or underflows.
    rows = torch.where(meta.block_groups < 0, batch, meta.block_groups).long()
    block_max = scores.amax(-1)  # [NB, Hk, G]
    seq_max = torch.full((batch + 1, num_kv_heads, group), float("-inf"), device=query.device)
    seq_max = seq_max.scatter_reduce(
        0, rows.view(-1, 1, 1).expand_as(block_max), block_max, reduce="amax"
    )
    probs = torch.exp(scores - seq_max.index_select(0, rows).unsqueeze(-1))
    block_out = torch.matmul(probs, values.float())  # [NB, Hk, G, D]
    # block -> batch: sum each sequence's blocks, then normalise by its summed weights.
    to_batch = mapping.float().t()  # [B, NB]
    out = (to_batch @ block_out.reshape(num_entries, -1)).view(batch, num_heads, head_dim)
    sums = (to_batch @ probs.sum(-1).reshape(num_entries, -1)).view(batch, num_heads, 1)
    return (out / sums.clamp_min(torch.finfo(torch.float32).tiny)).to(query.dtype)


class HpuFlatAttention(AttentionBackend):
    """Decode through :func:`flat_paged_attention`; prefill through the reference op.

    Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (keys, values),
    the layout Gaudi's cache update and fetch take per K and V.
    """

    name = "HPU_ATTN"

    def __init__(
        self,
        spec: AttentionLayerSpec,
        *,
        contiguous: bool = False,
        batch_buckets: BucketRange = DEFAULT_BATCH_BUCKETS,
        block_buckets: BucketRange = DEFAULT_BLOCK_BUCKETS,
    ) -> None:
        super().__init__(spec)
        self.contiguous = contiguous
        self.batch_buckets = batch_buckets
        self.block_buckets = block_buckets
        # All layers of a step share one AttentionMetadata, so its decode layout is
        # built once, by the first layer, and reused by identity.
        self._built: tuple[AttentionMetadata, HpuDecodeMetadata] | None = None

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def decode_metadata(self, meta: AttentionMetadata, num_blocks: int) -> HpuDecodeMetadata:
        """The flat layout of an all-decode step, built once per step."""
        if self._built is not None and self._built[0] is meta:
            return self._built[1]
        tables: Sequence[Sequence[int]] = meta.block_tables.tolist()
        built = build_decode_metadata(
            tables,
            meta.seq_lens_host,
            meta.block_size,
            num_blocks,
            contiguous=self.contiguous,
            batch_buckets=self.batch_buckets,
            block_buckets=self.block_buckets,
            dtype=torch.float32,
            device=meta.block_tables.device,
        )
        self._built = (meta, built)
        return built

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        if not meta.is_all_decode:
            # Prefill and mixed steps: Gaudi would use FusedSDPA here (not wired yet).
            return reference.paged_attention(
                query,
                key_cache,
                value_cache,
                meta.block_tables,
                meta.seq_lens_host,
                meta.query_lens,
                self.spec.scale,
            )
        flat = self.decode_metadata(meta, key_cache.shape[0])
        padded = query.new_zeros((flat.batch_size, *query.shape[1:]))
        padded[: flat.num_seqs] = query
        out = flat_paged_attention(padded, key_cache, value_cache, flat, self.spec.scale)
        return out[: flat.num_seqs]
