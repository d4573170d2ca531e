"""XFORMERS: attention over the paged KV cache with xFormers' paged attention biases.

Written against xFormers' documented API: ``memory_efficient_attention_forward`` with a
``BlockDiagonalCausalWithOffsetPaddedKeysMask`` made paged by ``make_paged(block_tables,
page_size, PagedBlockDiagonalCausalWithOffsetPaddedKeysMask)``, which reads keys and
values through the block table. Not yet run on a GPU: see the plugin README.
"""

from __future__ import annotations

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.ops import reference

__all__ = ["XFormersAttention"]


class XFormersAttention(AttentionBackend):
    """Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (keys, values).

    Grouped-query attention uses xFormers' 5-d "BMGHK" form: queries ``[1, T, Hk, G, D]``,
    keys and values ``[1, blocks*block_size, Hk, G, D]`` broadcast over the group ``G``
    (an expand, no copy).
    """

    name = "XFORMERS"

    # The reference ops read and write the cache, so it has the reference's layout.
    kv_cache_shape = staticmethod(ReferenceAttention.kv_cache_shape)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        from xformers.ops import fmha

        key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        spec = self.spec
        group = spec.num_heads // spec.num_kv_heads
        num_blocks, block_size = key_cache.shape[:2]
        bias = fmha.attn_bias.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=meta.query_lens,
            kv_padding=meta.block_tables.shape[1] * block_size,
            kv_seqlen=meta.seq_lens_host,
        ).make_paged(
            block_tables=meta.block_tables,
            page_size=block_size,
            paged_type=fmha.attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
        )
        t = query.shape[0]
        q = query.view(1, t, spec.num_kv_heads, group, spec.head_dim)

        def paged(cache: torch.Tensor) -> torch.Tensor:
            flat = cache.view(1, num_blocks * block_size, spec.num_kv_heads, 1, spec.head_dim)
            return flat.expand(-1, -1, -1, group, -1)

        out: torch.Tensor = fmha.memory_efficient_attention_forward(
            q, paged(key_cache), paged(value_cache), attn_bias=bias, scale=spec.scale
        )
        return out.view(t, spec.num_heads, spec.head_dim)
