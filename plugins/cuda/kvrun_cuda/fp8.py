"""fp8 KV cache (``kv_cache_dtype=fp8``): per-layer scales and the torch attention path.

Keys and values are stored as ``float8_e4m3fn`` divided by a per-layer scale. As in
vLLM, the scales are measured once, on the first forward that writes the layer:
``k_scale = max|key| / K_SCALE_CONSTANT`` and ``v_scale = max|value| / V_SCALE_CONSTANT``
(defaults 200 and 100 keep the scaled values well inside e4m3's +-448). Reading
dequantises only the blocks the batch's block tables name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.errors import ConfigError
from kvrun.ops import reference

__all__ = [
    "FP8_KV_DTYPE",
    "Fp8KVCacheAttention",
    "KVScales",
    "dequantize",
    "kv_scales",
    "quantize",
    "resolve_kv_cache_dtype",
]

FP8_KV_DTYPE = torch.float8_e4m3fn
# vLLM's accepted spellings for the fp8 cache; e4m3 is the format its scales target.
_FP8_NAMES = ("fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """``kv_cache_dtype`` as a torch dtype: "auto" is the model's, fp8 is e4m3."""
    if name == "auto":
        return model_dtype
    if name in _FP8_NAMES:
        return FP8_KV_DTYPE
    raise ConfigError(f"kv_cache_dtype={name!r} is not supported; accepted: auto, fp8, fp8_e4m3")


@dataclass(frozen=True)
class KVScales:
    """One layer's dequantisation scales: stored value x scale = original."""

    k_scale: float
    v_scale: float


def kv_scales(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    k_scale_constant: int,
    v_scale_constant: int,
) -> KVScales:
    # An all-zero first batch would give a zero scale; 1.0 then stores zeros exactly.
    k_max = float(key.abs().max()) if key.numel() else 0.0
    v_max = float(value.abs().max()) if value.numel() else 0.0
    return KVScales(
        k_scale=k_max / k_scale_constant if k_max > 0 else 1.0,
        v_scale=v_max / v_scale_constant if v_max > 0 else 1.0,
    )


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` in fp8, saturated to e4m3's range (a cast alone would give NaN)."""
    limit = torch.finfo(FP8_KV_DTYPE).max
    return (x.float() / scale).clamp(-limit, limit).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


class Fp8KVCacheAttention(AttentionBackend):
    """The reference attention over an fp8 cache; the oracle for fp8 kernels.

    Cache layout as the reference: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
    of ``float8_e4m3fn``. One instance serves all layers; scales are kept per layer,
    keyed by the layer's cache tensor.
    """

    name = "REFERENCE_FP8"

    def __init__(
        self, spec: AttentionLayerSpec, k_scale_constant: int = 200, v_scale_constant: int = 100
    ) -> None:
        super().__init__(spec)
        self.k_scale_constant = k_scale_constant  # K_SCALE_CONSTANT
        self.v_scale_constant = v_scale_constant  # V_SCALE_CONSTANT
        self.scales: dict[int, KVScales] = {}  # kv_cache.data_ptr() -> that layer's scales

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
        assert kv_cache.dtype == FP8_KV_DTYPE, kv_cache.dtype
        layer = kv_cache.data_ptr()
        scales = self.scales.get(layer)
        if scales is None:
            scales = kv_scales(key, value, self.k_scale_constant, self.v_scale_constant)
            self.scales[layer] = scales
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.reshape_and_cache(
            quantize(key, scales.k_scale),
            quantize(value, scales.v_scale),
            key_cache,
            value_cache,
            meta.slot_mapping,
        )
        # Dequantise only the blocks this batch reads, then renumber them 0..n-1.
        num_seqs, max_blocks = meta.block_tables.shape
        used = meta.block_tables.long().flatten()
        keys = dequantize(key_cache[used], scales.k_scale, query.dtype)
        values = dequantize(value_cache[used], scales.v_scale, query.dtype)
        tables = torch.arange(num_seqs * max_blocks, device=query.device).view(num_seqs, -1)
        return reference.paged_attention(
            query, keys, values, tables, meta.seq_lens_host, meta.query_lens, self.spec.scale
        )
