"""kvrun-cuda fp8 KV cache: scales from K/V_SCALE_CONSTANT, attention against the reference."""

from __future__ import annotations

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.engine.batch import build_batch
from kvrun.errors import ConfigError
from kvrun.scheduling.output import ScheduledChunk
from kvrun_cuda.fp8 import (
    FP8_KV_DTYPE,
    FP8_KV_DTYPES,
    Fp8KVCacheAttention,
    KVScales,
    LayerScales,
    dequantize,
    fp8_max,
    kv_scales,
    quantize,
    resolve_kv_cache_dtype,
)

SPEC = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
BLOCK = 4
CPU = torch.device("cpu")


def test_kv_cache_dtype_names() -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == FP8_KV_DTYPE
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float16) == FP8_KV_DTYPE
    fnuz = torch.float8_e4m3fnuz
    assert resolve_kv_cache_dtype("fp8", torch.float16, fnuz) == fnuz
    assert resolve_kv_cache_dtype("auto", torch.float16, fnuz) == torch.float16
    with pytest.raises(ConfigError) as err:
        resolve_kv_cache_dtype("fp8_e5m2", torch.float16)
    assert str(err.value) == (
        "kv_cache_dtype='fp8_e5m2' is not supported; accepted: auto, fp8, fp8_e4m3"
    )


def test_scales_follow_the_constants() -> None:
    key = torch.tensor([[[1.0, -4.0]]])
    value = torch.tensor([[[0.5, 2.0]]])
    assert kv_scales(key, value, 200, 100) == KVScales(k_scale=4.0 / 200, v_scale=2.0 / 100)
    assert kv_scales(key, value, 8, 1) == KVScales(k_scale=0.5, v_scale=2.0)
    assert kv_scales(key * 0, value * 0, 200, 100) == KVScales(1.0, 1.0)


def test_layer_scales_are_measured_once_per_cache() -> None:
    scales = LayerScales(k_scale_constant=2, v_scale_constant=4)
    first, second = torch.zeros(2, 1, 4, 1, 2), torch.zeros(2, 1, 4, 1, 2)
    kv = torch.full((1, 1, 2), 8.0)
    assert scales.get(first, kv, kv) == KVScales(4.0, 2.0)
    assert scales.get(first, kv * 10, kv * 10) == KVScales(4.0, 2.0)  # kept, not re-measured
    assert scales.get(second, kv * 10, kv) == KVScales(40.0, 2.0)
    assert len(scales.by_layer) == 2
    scales.clear()
    assert scales.by_layer == {}


def test_quantize_saturates_and_round_trips() -> None:
    x = torch.tensor([0.0, 1.0, -3.0, 1000.0])
    q = quantize(x, 0.5)
    assert q.dtype == FP8_KV_DTYPE
    assert dequantize(q, 0.5, torch.float32).tolist() == [0.0, 1.0, -3.0, 224.0]  # 448 x 0.5


def test_quantize_into_e4m3fnuz_saturates_at_240_with_no_negative_zero() -> None:
    fnuz = torch.float8_e4m3fnuz
    assert (fp8_max(FP8_KV_DTYPE), fp8_max(fnuz)) == (448.0, 240.0)
    q = quantize(torch.tensor([0.0, 1.0, -3.0, 1000.0, -1000.0, -0.0, -1e-6]), 0.5, fnuz)
    assert q.dtype == fnuz
    assert dequantize(q, 0.5, torch.float32).tolist() == [0.0, 1.0, -3.0, 120.0, -120.0, 0, 0]
    # Exponent bias 8 (2.0 is 0x48, 0x40 in e4m3fn); 0x80 is fnuz's NaN, so a negative
    # zero or an underflow must be stored as 0x00.
    assert q.view(torch.uint8).tolist() == [0x00, 0x48, 0xD4, 0x7F, 0xFF, 0x00, 0x00]


@pytest.mark.parametrize("fp8_dtype", FP8_KV_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_fp8_attention_matches_the_reference_within_fp8_precision(
    fp8_dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    num_blocks = 8
    fp8 = Fp8KVCacheAttention(SPEC, k_scale_constant=200, v_scale_constant=100)
    ref = ReferenceAttention(SPEC)
    shape = (2, num_blocks, BLOCK, SPEC.num_kv_heads, SPEC.head_dim)
    fp8_cache = torch.zeros(shape, dtype=fp8_dtype)
    ref_cache = torch.zeros(shape, dtype=torch.float32)
    steps = [
        [
            ScheduledChunk("a", list(range(6)), 0, [3, 5], True, True),
            ScheduledChunk("b", list(range(3)), 0, [1], True, True),
        ],
        [
            ScheduledChunk("a", [0], 6, [3, 5], True, False),
            ScheduledChunk("b", [0, 0], 3, [1, 6], True, True),
        ],
    ]
    for chunks in steps:
        meta = build_batch(chunks, BLOCK, CPU).meta
        t = meta.num_tokens
        q = torch.randn(t, SPEC.num_heads, SPEC.head_dim)
        k = torch.randn(t, SPEC.num_kv_heads, SPEC.head_dim)
        v = torch.randn(t, SPEC.num_kv_heads, SPEC.head_dim)
        got = fp8.forward(q, k, v, fp8_cache, meta)
        want = ref.forward(q, k, v, ref_cache, meta)
        assert got.shape == want.shape == (t, SPEC.num_heads, SPEC.head_dim)
        # e4m3 keeps 3 mantissa bits: relative error per element up to 1/16.
        assert torch.allclose(got, want, atol=0.1, rtol=0.1), (got - want).abs().max()
    # One scale pair per layer, measured on the first step and kept.
    (scales,) = fp8.scales.by_layer.values()
    assert scales.k_scale > 0 and scales.v_scale > 0
    stored = dequantize(fp8_cache[0, 3], scales.k_scale, torch.float32)
    assert torch.allclose(stored, ref_cache[0, 3], atol=0.02, rtol=0.07)
