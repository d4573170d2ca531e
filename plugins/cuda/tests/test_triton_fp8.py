"""TRITON_ATTN over an fp8 KV cache against the torch fp8 path (REFERENCE_FP8), step by step.

Both backends run the same steps (chunked prefills, decodes, a prefix hit) on caches
that start with the same finite garbage; after every step their outputs must agree
within the activation dtype's tolerance, their caches byte for byte, and their
measured scales exactly. Both fp8 formats: ``float8_e4m3fn`` and MI300's
``float8_e4m3fnuz``.

Triton's interpreter rounds to fp8 wrongly (15.6 becomes 8, not 16: a rounding that
carries into the exponent loses it), so on CPU every key and value is an fp8 number
times a power-of-two scale and the scale constants are powers of two: quantising is
then exact, and equal bytes test the scaling, saturation and slots. Rounding proper
is left to the GPU test at the end, where compiled Triton divides with fp32
``div.full`` (within 2 ulp, not correctly rounded), so a value that lands on a
rounding boundary may be stored one fp8 step away from torch's choice.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata
from kvrun.engine.batch import build_batch
from kvrun.envs import read_env
from kvrun.scheduling.output import ScheduledChunk
from kvrun_cuda.backends import TRITON_FP8, refusals
from kvrun_cuda.fp8 import FP8_KV_DTYPES, Fp8KVCacheAttention, fp8_max
from kvrun_cuda.platform import CudaPlatform
from kvrun_cuda.triton.attention import TritonAttention, TritonFp8Attention
from kvrun_cuda.triton.launch import compile_blocker

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
SPEC = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=32, scale=32**-0.5)
BLOCK, NUM_BLOCKS = 4, 16
# Powers of two, inside both formats' range (fnuz stops at 240): exact scales on CPU.
K_CONST, V_CONST = 128, 64
K_STEP, V_STEP = 2.0**-4, 2.0**-3  # the scales the first step's maxima give

# Request a: 6-token prompt, then decodes. b: 7-token prompt in chunks of 3 and 4, then
# decodes. c: shares a's first block (a 4-token prefix hit) and computes 3 more tokens.
STEPS = [
    [
        ScheduledChunk("a", [0] * 6, 0, [3, 5], True, True),
        ScheduledChunk("b", [0] * 3, 0, [1, 6], False, True),
    ],
    [
        ScheduledChunk("a", [0], 6, [3, 5], True, False),
        ScheduledChunk("b", [0] * 4, 3, [1, 6], True, True),
    ],
    [
        ScheduledChunk("c", [0] * 3, 4, [3, 9], True, True),
        ScheduledChunk("a", [0], 7, [3, 5, 2], True, False),
        ScheduledChunk("b", [0], 7, [1, 6, 11], True, False),
    ],
    [  # decode only: the kernel's split-context path
        ScheduledChunk("a", [0], 8, [3, 5, 2], True, False),
        ScheduledChunk("b", [0], 8, [1, 6, 11], True, False),
        ScheduledChunk("c", [0], 7, [3, 9], True, False),
    ],
]


def skip_unless_stored_here(fp8: torch.dtype, device: torch.device) -> None:
    if fp8 == torch.float8_e4m3fnuz and device.type == "cuda" and torch.version.hip is None:
        pytest.skip("Triton has float8_e4m3fnuz (fp8e4b8) on AMD GPUs only")


def exact_fp8(
    gen: torch.Generator, shape: tuple[int, ...], step: float, limit: float, fp8: torch.dtype
) -> torch.Tensor:
    """fp8 numbers within +-limit, times ``step``: x / step is exact, and so is its cast."""
    grid = (torch.randn(shape, generator=gen) * limit / 3).clamp(-limit, limit)
    return grid.to(fp8).float() * step


def run_steps(
    fp8: torch.dtype,
    dtype: torch.dtype,
    device: torch.device,
    inputs: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    tol: float | None = None,
) -> tuple[TritonFp8Attention, Fp8KVCacheAttention, torch.Tensor, torch.Tensor]:
    """Run STEPS through both backends, comparing each step's outputs; return the caches.

    ``inputs(step, tokens)`` gives that step's keys and values, [tokens, Hk, D] fp32.
    ``tol`` None: the activation dtype's tolerance (the caches hold the same bytes).
    """
    gen = torch.Generator().manual_seed(0)
    shape = TritonAttention.kv_cache_shape(NUM_BLOCKS, BLOCK, SPEC.num_kv_heads, SPEC.head_dim)
    limit = fp8_max(fp8)
    garbage = (torch.randn(shape, generator=gen) * limit / 3).clamp(-limit, limit).to(fp8)
    tri_cache, ref_cache = garbage.to(device), garbage.clone().to(device)
    tri = TritonFp8Attention(SPEC, K_CONST, V_CONST)
    ref = Fp8KVCacheAttention(SPEC, K_CONST, V_CONST)
    for i, chunks in enumerate(STEPS):
        meta: AttentionMetadata = build_batch(chunks, BLOCK, device).meta
        tokens = meta.num_tokens
        query = torch.randn(tokens, SPEC.num_heads, SPEC.head_dim, generator=gen)
        query = query.to(dtype=dtype, device=device)
        key, value = (x.to(dtype=dtype, device=device) for x in inputs(i, tokens))
        got = tri.forward(query, key, value, tri_cache, meta)
        want = ref.forward(query, key, value, ref_cache, meta)
        close = TOLERANCE[dtype] if tol is None else tol
        torch.testing.assert_close(got, want, rtol=close, atol=close, msg=f"step {i}")
    return tri, ref, tri_cache, ref_cache


@pytest.mark.parametrize("fp8", FP8_KV_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_fp8_stores_and_reads_what_the_torch_fp8_path_does(
    device: torch.device, fp8: torch.dtype, dtype: torch.dtype
) -> None:
    skip_unless_stored_here(fp8, device)
    gen = torch.Generator().manual_seed(1)
    kv_shape = (SPEC.num_kv_heads, SPEC.head_dim)

    def inputs(step: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = exact_fp8(gen, (tokens, *kv_shape), K_STEP, K_CONST, fp8)
        value = exact_fp8(gen, (tokens, *kv_shape), V_STEP, V_CONST, fp8)
        if step == 0:  # the maxima that set the scales: exactly K_STEP and V_STEP
            key[0, 0, 0], value[-1, 1, 2] = K_CONST * K_STEP, -V_CONST * V_STEP
        if step == 1:  # beyond the format's range once scaled: both saturate
            key[0, 0, :2] = torch.tensor([1e3, -1e3]) * K_STEP
        return key, value

    tri, ref, tri_cache, ref_cache = run_steps(fp8, dtype, device, inputs)
    assert list(tri.scales.by_layer.values()) == list(ref.scales.by_layer.values())
    (scales,) = tri.scales.by_layer.values()
    assert (scales.k_scale, scales.v_scale) == (K_STEP, V_STEP)
    assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
    # Step 1's saturated key is request a's decode at position 6: block 5, offset 2.
    limit = fp8_max(fp8)
    assert tri_cache[0, 5, 2, 0, :2].float().tolist() == [limit, -limit]


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8_KV_DTYPES, ids=["e4m3fn", "e4m3fnuz"])
def test_triton_fp8_rounds_random_values_as_torch_does_on_the_gpu(fp8: torch.dtype) -> None:
    if not torch.cuda.is_available() or compile_blocker() is not None:
        pytest.skip("needs a GPU and compiled Triton")
    device = torch.device("cuda")
    skip_unless_stored_here(fp8, device)
    gen = torch.Generator().manual_seed(2)

    def inputs(step: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (tokens, SPEC.num_kv_heads, SPEC.head_dim)
        return torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)

    # A value stored one fp8 step away moves the outputs by more than fp16's tolerance.
    tri, ref, tri_cache, ref_cache = run_steps(fp8, torch.float16, device, inputs, tol=0.05)
    assert list(tri.scales.by_layer.values()) == list(ref.scales.by_layer.values())
    differ = tri_cache.view(torch.uint8) != ref_cache.view(torch.uint8)
    assert differ.float().mean() < 1e-3, differ.sum()
    # Where they differ, by one fp8 step at most (3 mantissa bits: 1/8 relative).
    a, b = tri_cache.float()[differ], ref_cache.float()[differ]
    assert torch.all((a - b).abs() <= b.abs() / 8 + 2.0**-9)


# --- the platform ---------------------------------------------------------------------------


def fp8_spec(fp8: torch.dtype = torch.float8_e4m3fn) -> AttentionLayerSpec:
    return AttentionLayerSpec(4, 2, 64, 0.125, dtype=torch.float16, kv_cache_dtype=fp8)


def test_the_fp8_entry_refuses_what_the_kernels_cannot_run() -> None:
    # The table the choice reads (no triton import) agrees with the backend's own check.
    for head_dim in (0, 1, 80, 256, 257):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            spec = AttentionLayerSpec(2, 2, head_dim, 1.0, dtype, torch.float8_e4m3fn)
            refused = bool(refusals(TRITON_FP8, spec, dtype, lambda m: True))
            assert refused == (TritonAttention.unsupported_reason(head_dim, dtype) is not None)


def test_the_platform_reads_fp8_with_triton_where_it_runs() -> None:
    platform = CudaPlatform(read_env({"K_SCALE_CONSTANT": "50", "V_SCALE_CONSTANT": "25"}))
    for fp8 in FP8_KV_DTYPES:
        auto = platform.attention_backend(None, fp8_spec(fp8))
        assert isinstance(auto, TritonFp8Attention) and auto.name == "TRITON_ATTN"
        assert (auto.scales.k_scale_constant, auto.scales.v_scale_constant) == (50, 25)
        assert platform.attention_backend("triton_attn", fp8_spec(fp8)) is auto
    plain = platform.attention_backend("TRITON_ATTN", AttentionLayerSpec(4, 2, 64, 0.125))
    assert type(plain) is TritonAttention  # the same name without fp8: a separate backend
    reference = platform.attention_backend("REFERENCE_FP8", fp8_spec())
    assert isinstance(reference, Fp8KVCacheAttention)
    assert (reference.scales.k_scale_constant, reference.scales.v_scale_constant) == (50, 25)


def test_profiling_clears_both_fp8_backends_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch.cuda calls around the dummy forward, stood in for on CPU.
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 << 30, 2 << 30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 123)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 456)
    platform = CudaPlatform(read_env({}))
    backends = [
        platform.attention_backend(name, fp8_spec()) for name in ("TRITON_ATTN", "REFERENCE_FP8")
    ]
    dummy_cache = torch.zeros(2, 1, BLOCK, 2, 64, dtype=torch.float8_e4m3fn)
    kv = torch.ones(1, 2, 64)

    def dummy_forward() -> None:
        for backend in backends:
            assert isinstance(backend, TritonFp8Attention | Fp8KVCacheAttention)
            backend.scales.get(dummy_cache, kv, kv)

    assert platform.measure_peak_memory(dummy_forward) == 123
    for backend in backends:
        assert isinstance(backend, TritonFp8Attention | Fp8KVCacheAttention)
        assert backend.scales.by_layer == {}


def test_the_engines_warm_up_leaves_no_scales() -> None:
    # LLMEngine.warm_up() calls discard_calibration() after writing dummy tokens.
    platform = CudaPlatform(read_env({}))
    backend = platform.attention_backend("TRITON_ATTN", fp8_spec())
    assert isinstance(backend, TritonFp8Attention)
    cache = torch.zeros(2, 1, BLOCK, 2, 64, dtype=torch.float8_e4m3fn)
    backend.scales.get(cache, torch.ones(1, 2, 64), torch.ones(1, 2, 64))
    assert len(backend.scales.by_layer) == 1
    platform.discard_calibration()
    assert backend.scales.by_layer == {}
