"""The core's reference attention backend: the reference ops over a paged cache."""

from __future__ import annotations

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.ops import reference

__all__ = ["ReferenceAttention"]


class ReferenceAttention(AttentionBackend):
    """Slow and obviously right: the oracle every other backend is tested against.

    Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (keys, values);
    the latent cache (``latent_kv``) is the keys' plane alone, ``[1, ...]`` of the same.
    """

    name = "REFERENCE"
    features = frozenset({"sliding_window", "logit_softcap", "latent_kv"})

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @staticmethod
    def latent_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (1, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        latent = self.spec.latent_value_dim
        if latent is not None:  # one plane: the value is read from the cached key
            key_cache = value_cache = kv_cache[0]
            value = key
        else:
            key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        out = reference.paged_attention(
            query,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens_host,
            meta.query_lens,
            self.spec.scale,
            sliding_window=self.spec.sliding_window,
            logit_softcap=self.spec.logit_softcap,
        )
        return out if latent is None else out[..., :latent].contiguous()
