"""TRITON_ATTN: attention over the paged KV cache in kvrun's own Triton kernels.

Cache layout, one tensor per layer: ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (keys, then values). It is the reference backend's layout: each cached
token's keys for all kv heads form one contiguous row of ``num_kv_heads * head_dim``
elements, so the kernel's K/V tile loads are ``head_dim``-long contiguous runs (256
bytes at head_dim 128 in fp16), and the reference ops run on the same tensors, which
is how the tests compare the two.

fp8 caches: the kernels take per-layer scales (``reshape_and_cache(..., k_scale,
v_scale)``, ``unified_attention(..., k_scale=, v_scale=)``). :class:`TritonAttention`
passes none, so an fp8 cache given to it would be written and read with unit scales;
the platform gives fp8 caches to :class:`TritonFp8Attention`, which measures each
layer's scales as the torch fp8 path does (``kvrun_cuda.fp8``: K_SCALE_CONSTANT /
V_SCALE_CONSTANT, on the layer's first write) and calls the same kernels with them.
"""

from __future__ import annotations

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun_cuda.fp8 import FP8_KV_DTYPES, LayerScales
from kvrun_cuda.triton.elementwise import reshape_and_cache
from kvrun_cuda.triton.paged_attention import unified_attention

__all__ = ["TritonAttention", "TritonFp8Attention"]

# What the kernels are written and tested for; a platform asked for anything else
# reports why (unsupported_reason) instead of launching.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


class TritonAttention(AttentionBackend):
    """Paged decode and varlen prefill (chunks and prefix hits included) in one kernel.

    Stateless between calls, so one instance may serve every layer; nothing in
    ``forward`` reads a device tensor back to the host, so a decode step can be
    captured in a CUDA graph (the grid depends on ``meta.max_query_len`` and the
    batch size only).
    """

    name = "TRITON_ATTN"
    # The latent cache (``[1, num_blocks, block_size, num_kv_heads, head_dim]``): the
    # kernels read its one plane as keys and as values.
    features = frozenset({"latent_kv"})

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

    @staticmethod
    def unsupported_reason(head_dim: int, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run a model with this head size and dtype, or None."""
        if dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            return (
                f"TRITON_ATTN does not support dtype {str(dtype).removeprefix('torch.')}; "
                f"supported: {names}"
            )
        if not 1 <= head_dim <= MAX_HEAD_DIM:
            return f"TRITON_ATTN supports head sizes 1..{MAX_HEAD_DIM}, not {head_dim}"
        return None

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        return self._write_and_attend(query, key, value, kv_cache, meta)

    def _write_and_attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        k_scale: float = 1.0,  # an fp8 cache's per-layer scales; 1.0 for any other
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Store the new keys and values, then attend over the cache: two launches.

        A latent spec's one plane is passed as both caches: its keys are written (twice,
        the same bytes) and read as the values, whose first latent columns are returned.
        """
        latent = self.spec.latent_value_dim
        if latent is not None:
            key_cache = value_cache = kv_cache[0]
            value = key
        else:
            key_cache, value_cache = kv_cache[0], kv_cache[1]
        assert key_cache.shape[1] == meta.block_size, (key_cache.shape, meta.block_size)
        reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping, k_scale, v_scale)
        out = unified_attention(
            query,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.max_query_len,
            self.spec.scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return out if latent is None else out[..., :latent].contiguous()


class TritonFp8Attention(TritonAttention):
    """TRITON_ATTN over an fp8 cache (``float8_e4m3fn``, or ``float8_e4m3fnuz`` on MI300).

    The same kernels and cache layout as :class:`TritonAttention`, with each layer's
    scales measured exactly as :class:`kvrun_cuda.fp8.Fp8KVCacheAttention` (the oracle)
    measures them, so both store the same bytes and read the same values. Not graph-safe,
    unlike its parent: the first write to a layer reads its maxima back to the host, and
    one instance keeps every layer's scales. No latent cache: keys and values are scaled
    apart, so one plane cannot be read as both (DeepSeek keeps two planes here).
    """

    features = frozenset()

    def __init__(
        self, spec: AttentionLayerSpec, k_scale_constant: int = 200, v_scale_constant: int = 100
    ) -> None:
        super().__init__(spec)
        self.scales = LayerScales(k_scale_constant, v_scale_constant)

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim] fp8
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        assert kv_cache.dtype in FP8_KV_DTYPES, kv_cache.dtype
        scales = self.scales.get(kv_cache, key, value)
        return self._write_and_attend(
            query, key, value, kv_cache, meta, scales.k_scale, scales.v_scale
        )
