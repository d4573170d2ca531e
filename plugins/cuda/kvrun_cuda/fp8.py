"""fp8 KV cache (``kv_cache_dtype=fp8``): per-layer scales and the torch attention path.

Keys and values are stored as an fp8 e4m3 format divided by a per-layer scale:
``float8_e4m3fn`` (OCP e4m3, max 448: NVIDIA, and AMD from gfx950) or, on AMD MI300
(gfx94x), the hardware's own ``float8_e4m3fnuz`` (max 240, no negative zero, NaN is
0x80). The cache tensor's dtype says which; quantisation saturates to that dtype's
range. As in vLLM, the scales are measured once, on the first forward that writes the
layer: ``k_scale = max|key| / K_SCALE_CONSTANT`` and ``v_scale = max|value| /
V_SCALE_CONSTANT`` (defaults 200 and 100 keep the scaled values inside both formats'
range). Reading dequantises only the blocks the batch's block tables name.
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
    "FP8_KV_DTYPES",
    "Fp8KVCacheAttention",
    "KVScales",
    "LayerScales",
    "dequantize",
    "fp8_max",
    "kv_scales",
    "quantize",
    "resolve_kv_cache_dtype",
]

# What kv_cache_dtype=fp8 means unless a platform substitutes its hardware's variant.
FP8_KV_DTYPE = torch.float8_e4m3fn
# Every fp8 cache format the backends here read and write (the fnuz one for AMD MI300).
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
# vLLM's accepted spellings for the fp8 cache; e4m3 is the format its scales target.
_FP8_NAMES = ("fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, fp8_dtype: torch.dtype = FP8_KV_DTYPE
) -> torch.dtype:
    """``kv_cache_dtype`` as a torch dtype: "auto" is the model's, fp8 is ``fp8_dtype``."""
    if name == "auto":
        return model_dtype
    if name in _FP8_NAMES:
        return fp8_dtype
    raise ConfigError(f"kv_cache_dtype={name!r} is not supported; accepted: auto, fp8, fp8_e4m3")


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 cache format: 448 for e4m3fn, 240 for e4m3fnuz."""
    assert dtype in FP8_KV_DTYPES, dtype
    return float(torch.finfo(dtype).max)


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


class LayerScales:
    """Each layer's scales, measured from the first batch that writes the layer, then kept.

    Keyed by the layer's cache tensor (its address), so one backend instance serves every
    layer. Measuring reads the maxima back to the host: a backend that uses this cannot
    be captured in a CUDA graph, whose warm-up would also measure on dummy tokens.
    """

    def __init__(self, k_scale_constant: int = 200, v_scale_constant: int = 100) -> None:
        self.k_scale_constant = k_scale_constant  # K_SCALE_CONSTANT
        self.v_scale_constant = v_scale_constant  # V_SCALE_CONSTANT
        self.by_layer: dict[int, KVScales] = {}  # kv_cache.data_ptr() -> that layer's scales

    def get(
        self,
        kv_cache: torch.Tensor,
        key: torch.Tensor,  # [T, Hk, D] this batch's keys, measured on the first write
        value: torch.Tensor,  # [T, Hk, D]
    ) -> KVScales:
        layer = kv_cache.data_ptr()
        scales = self.by_layer.get(layer)
        if scales is None:
            scales = kv_scales(key, value, self.k_scale_constant, self.v_scale_constant)
            self.by_layer[layer] = scales
        return scales

    def clear(self) -> None:
        """Forget every layer (a profiling run's throwaway caches must leave no scales)."""
        self.by_layer.clear()


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype = FP8_KV_DTYPE) -> torch.Tensor:
    """``x / scale`` in the fp8 ``dtype``, saturated to its range (a cast alone gives NaN)."""
    limit = fp8_max(dtype)
    return (x.float() / scale).clamp(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


class Fp8KVCacheAttention(AttentionBackend):
    """The reference attention over an fp8 cache; the oracle for fp8 kernels.

    Cache layout as the reference: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
    of one of :data:`FP8_KV_DTYPES`. One instance serves all layers; scales are kept per
    layer (:class:`LayerScales`).
    """

    name = "REFERENCE_FP8"

    def __init__(
        self, spec: AttentionLayerSpec, k_scale_constant: int = 200, v_scale_constant: int = 100
    ) -> None:
        super().__init__(spec)
        self.scales = LayerScales(k_scale_constant, v_scale_constant)

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
        fp8 = kv_cache.dtype
        assert fp8 in FP8_KV_DTYPES, fp8
        scales = self.scales.get(kv_cache, key, value)
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        reference.reshape_and_cache(
            quantize(key, scales.k_scale, fp8),
            quantize(value, scales.v_scale, fp8),
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
