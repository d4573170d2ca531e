"""GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices run as stored (csrc/quant.c), on every ISA this CPU
runs (the AVX512-VNNI kernels and the portable C).

Two oracles. Exact: the kernel's own arithmetic in float64 (activations quantized to
int8 per block of 32 as the kernel does, the loader's dequantized weights), which it
must meet to float32 rounding. Format tolerance: dequantize-then-matmul (the loader's
dequantization and a float matmul, what ``quantization=None`` computes), which it meets
to the int8 activations' rounding: a relative error of the output norm under 1.5e-2
(measured: 4-7e-3 on random Gaussian data for all three types).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvrun.ops import reference
from kvrun.quantization import QuantizedMatrix
from kvrun_cpu import ops
from kvrun_cpu.native import NativeKernels
from kvrun_cpu.native.quantized import (
    QuantizedPackedWeight,
    pack_quantized,
    quantized_linear,
    quantized_rows,
)

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPER_BLOCKS = {"Q4_K": 144, "Q6_K": 210}  # bytes per 256 values
ROWS = (1, 3, 17, 64)
SHAPES = ((960, 576), (37, 64), (100, 1536))  # 37: not a multiple of the 16-row panel
FORMAT_TOL = 1.5e-2


def width(qtype: str, k: int) -> int:
    """k, rounded up to whole super-blocks of 256 for Q4_K and Q6_K."""
    return -(-k // 256) * 256 if qtype in SUPER_BLOCKS else k


def gguf_matrix(qtype: str, n: int, k: int, seed: int = 0) -> QuantizedMatrix:
    """Random weights quantized by gguf-py; Q4_K and Q6_K (which gguf-py only reads) as
    random super-blocks whose fp16 d (and dmin) stay below 1, as the test GGUF writer
    makes them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == "Q4_K":
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, 0x3C, (n, k // 256 * 144), dtype=np.uint8)
        return QuantizedMatrix(qtype, torch.from_numpy(blocks), k)
    if qtype == "Q6_K":  # any values; d's high byte keeps it below 1; int8 scales of
        # either sign and magnitudes 16-63, as a quantizer's are (not 1 beside 127)
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, 256, (n, k // 256, 210), dtype=np.uint8)
        scales = rng.integers(16, 64, (n, k // 256, 16)) * rng.choice([-1, 1], (n, k // 256, 16))
        blocks[..., 192:208] = scales.astype(np.int8).view(np.uint8)
        blocks[..., 209] = rng.integers(0, 0x3C, (n, k // 256), dtype=np.uint8)
        return QuantizedMatrix(qtype, torch.from_numpy(blocks.reshape(n, -1)), k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    blocks = quantize(w.numpy(), GGMLQuantizationType[qtype])
    return QuantizedMatrix(qtype, torch.from_numpy(blocks), k)


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def exact_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per row and block of 32 to int8
    (dx = max|x| / 127, round half to even), times the dequantized weights."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv)  # float32 product and rounding, as the kernel
    dx = (amax / 127.0).double()
    return (xq.double() * dx).reshape(m, k) @ w.double().T


@pytest.fixture(scope="module", params=TYPES)
def qtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_quantized_linear_meets_both_oracles(
    native_any_isa: NativeKernels, qtype: str, n: int, k: int
) -> None:
    k = width(qtype, k)
    matrix = gguf_matrix(qtype, n, k)
    packed = pack_quantized(matrix)
    assert packed.shape == (n, k)
    w = matrix.dequantize()
    bias = randn(n, seed=2)
    for m in ROWS:
        x = randn(m, k, seed=m)
        got = quantized_linear(native_any_isa, x, packed, bias)
        exact = exact_reference(x, w) + bias.double()
        scale = exact.abs().max()
        assert ((got.double() - exact).abs().max() / scale) < 1e-5, (qtype, m)
        plain = F.linear(x, w, bias)
        assert ((got - plain).norm() / plain.norm()) < FORMAT_TOL, (qtype, m)


def test_every_isa_gives_the_same_bits(
    native_any_isa: NativeKernels, native_kernels: NativeKernels, qtype: str
) -> None:
    # The VNNI kernels and the portable C sum the same integers and round the same
    # float operations in the same order.
    packed = pack_quantized(gguf_matrix(qtype, 100, width(qtype, 576)))
    x = randn(17, width(qtype, 576))
    want = quantized_linear(native_kernels, x, packed)
    assert torch.equal(quantized_linear(native_any_isa, x, packed), want)


def test_a_token_gets_the_same_bits_in_any_batch(native_kernels: NativeKernels, qtype: str) -> None:
    packed = pack_quantized(gguf_matrix(qtype, 960, width(qtype, 576)))
    x = randn(64, width(qtype, 576))
    full = quantized_linear(native_kernels, x, packed)
    for rows in (1, 3, 8, 17):
        assert torch.equal(
            quantized_linear(native_kernels, x[:rows].contiguous(), packed), full[:rows]
        )


def test_rows_are_the_loader_dequantization(native_any_isa: NativeKernels, qtype: str) -> None:
    matrix = gguf_matrix(qtype, 37, width(qtype, 64))
    ids = torch.tensor([0, 36, 17, 17, 5])
    got = quantized_rows(native_any_isa, ids, pack_quantized(matrix))
    assert torch.equal(got, matrix.dequantize()[ids])
    with pytest.raises(IndexError, match=r"^index 37 is out of range for 37 rows$"):
        quantized_rows(native_any_isa, torch.tensor([3, 37]), pack_quantized(matrix))


def test_packed_size_is_the_files(qtype: str) -> None:
    k = width(qtype, 576)
    matrix = gguf_matrix(qtype, 960, k)
    # the fp16 offset of Q4_0 / Q8_0; Q4_K: 16 bytes of nibbles and 8 of fp32 scale and
    # offset per 32 values, where the file has 144 bytes per 256; Q6_K: 24 bytes of
    # values and 8 of two fp32 scales per 32 values, where the file has 210 per 256
    extra = {"Q4_1": 0, "Q4_0": 2, "Q8_0": 2, "Q4_K": 24 - 144 / 8, "Q6_K": 32 - 210 / 8}[qtype]
    assert pack_quantized(matrix).nbytes == matrix.nbytes + 960 * (k // 32) * extra


def test_cpu_ops_take_gguf_blocks(native_kernels: NativeKernels, qtype: str) -> None:
    matrix = gguf_matrix(qtype, 100, width(qtype, 576))
    prepared = ops.prepare_linear(matrix, native=native_kernels)
    assert isinstance(prepared, QuantizedPackedWeight)
    x = randn(5, width(qtype, 576))
    want = reference.linear(x, matrix)  # dequantize-then-matmul
    got = ops.linear(x, prepared, native=native_kernels)
    assert ((got - want).norm() / want.norm()) < FORMAT_TOL
    bf16 = ops.linear(x.bfloat16(), prepared, native=native_kernels)
    assert bf16.dtype == torch.bfloat16
    # x rounded to bfloat16 first (0.4% per value), then the same int8 blocks
    assert ((bf16.float() - got).norm() / got.norm()) < FORMAT_TOL
    ids = torch.tensor([4, 99])
    assert torch.equal(
        ops.embedding(ids, prepared, native=native_kernels), matrix.dequantize()[ids]
    )
    # Without native kernels: the reference path on the blocks themselves.
    assert ops.prepare_linear(matrix) is matrix
    assert torch.equal(ops.linear(x, matrix), want)


@pytest.mark.parametrize(
    ("qtype", "k", "message"),
    [
        (
            "Q5_K",
            256,
            "GGUF type Q5_K is not kept quantized; accepted: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K",
        ),
        ("Q4_1", 48, "a Q4_1 matrix needs uint8 rows of whole 32-column blocks"),
        ("Q4_K", 576, "a Q4_K matrix needs uint8 rows of whole 256-column blocks"),
    ],
)
def test_unsupported_blocks_are_refused(qtype: str, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizedMatrix(qtype, torch.zeros((4, 40), dtype=torch.uint8), k)


def test_x_of_another_width_is_refused(native_kernels: NativeKernels) -> None:
    packed = pack_quantized(gguf_matrix("Q4_1", 16, 64))
    with pytest.raises(ValueError, match="x has 32 columns; the Q4_1 matrix takes 64"):
        quantized_linear(native_kernels, randn(2, 32), packed)


def test_zero_activations_give_the_bias(native_kernels: NativeKernels) -> None:
    packed = pack_quantized(gguf_matrix("Q8_0", 40, 64))
    bias = randn(40)
    got = quantized_linear(native_kernels, torch.zeros(3, 64), packed, bias)
    assert torch.equal(got, bias.expand(3, 40))
    assert np.isfinite(got.numpy()).all()
