"""TRITON_ATTN on ROCm: kvrun-cuda's Triton kernels, prefill per VLLM_USE_TRITON_FLASH_ATTN.

The Triton code is shared with kvrun-cuda (Triton compiles the same kernels for HIP).
With VLLM_USE_TRITON_FLASH_ATTN=1 (the default) every batch runs the Triton backend;
with 0, batches that contain a prefill run the core's torch path instead (decode-only
batches keep the Triton decode kernel), which is the escape hatch when a Triton
prefill kernel misbehaves on a given ROCm release.
"""

from __future__ import annotations

from typing import Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention

__all__ = ["RocmTritonAttention"]


class RocmTritonAttention(AttentionBackend):
    """Cache layout: the Triton backend's, which must equal the reference's (checked);
    the latent cache (one plane) too, as both paths compute it."""

    name = "TRITON_ATTN"
    features = frozenset({"latent_kv"})

    def __init__(self, spec: AttentionLayerSpec, use_triton_flash_attn: bool = True) -> None:
        super().__init__(spec)
        from kvrun_cuda.triton.attention import TritonAttention

        self.use_triton_flash_attn = use_triton_flash_attn  # VLLM_USE_TRITON_FLASH_ATTN
        self.triton: AttentionBackend = TritonAttention(spec)
        self.torch_path: AttentionBackend = ReferenceAttention(spec)
        # Both paths write the same cache tensor, so their layouts must agree.
        sample = (7, 16, spec.num_kv_heads, spec.head_dim)
        for layout in ("kv_cache_shape", "latent_kv_cache_shape"):
            ours = getattr(TritonAttention, layout)(*sample)
            assert ours == getattr(ReferenceAttention, layout)(*sample), (
                f"the Triton and reference KV-cache layouts differ ({layout})"
            )

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return ReferenceAttention.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    @staticmethod
    def latent_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return ReferenceAttention.latent_kv_cache_shape(
            num_blocks, block_size, num_kv_heads, head_dim
        )

    def variant(self, **changes: Any) -> AttentionBackend:
        """This backend for another layer's spec, both of its paths included."""
        other = super().variant(**changes)
        assert isinstance(other, RocmTritonAttention)
        other.triton = self.triton.variant(**changes)
        other.torch_path = self.torch_path.variant(**changes)
        return other

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.use_triton_flash_attn or meta.is_all_decode:
            return self.triton.forward(query, key, value, kv_cache, meta)
        return self.torch_path.forward(query, key, value, kv_cache, meta)
