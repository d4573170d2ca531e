"""AWQ 4-bit layers run as stored (csrc/quant.c's QAWQ format), on every ISA this CPU runs
(the AVX512-VNNI kernels and the portable C).

The layer is AutoAWQ's packing of a random weight (``tests/test_awq.py``'s packer: its
int32 words in the GEMM interleave), turned into rows by
:func:`kvrun.quantization.awq_rows` and repacked by ``pack_quantized``. Oracles as for
the GGUF formats (``test_cpu_quantized_linear.py``): exact, the kernel's own arithmetic
in float64 (activations quantized to int8 per block of 32, the reference
``awq_dequantize``'s weights), met to float32 rounding; format tolerance,
dequantize-then-matmul (what ``quantization=None`` computes), met to the int8
activations' rounding (relative error of the output norm, measured 4-5e-3 here).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvrun.ops import reference
from kvrun.quantization import QuantizedMatrix, awq_qtype, awq_rows, quantized_block
from kvrun_cpu import ops
from kvrun_cpu.native import NativeKernels
from kvrun_cpu.native.quantized import (
    QuantizedPackedWeight,
    pack_quantized,
    quantized_linear,
    quantized_rows,
)
from tests.test_awq import pack

ROWS = (1, 3, 17, 64)
SHAPES = ((40, 128), (104, 1536))  # 40: not a multiple of the 16-row panel
FORMAT_TOL = 1.5e-2  # as the GGUF formats'


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def exact_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per row and block of 32 to int8
    (dx = max|x| / 127, round half to even, float32 product), times the weights."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv)
    return (xq.double() * (amax / 127.0).double()).reshape(m, k) @ w.double().T


def awq_layer(
    n: int, k: int, group: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random AWQ tensors (qweight [k, n / 8], qzeros [k / group, n / 8], fp16 scales
    [k / group, n]) with every value and zero point 0..15 used, of a random weight's
    size (scales around 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group if group != -1 else 1
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (groups, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.2 + 0.01).half()
    return pack(q), pack(z), scales


@pytest.fixture(scope="module", params=(128, 64, 32))
def group(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_rows_hold_the_layers_values_exactly(group: int) -> None:
    qweight, qzeros, scales = awq_layer(48, 256, group)
    matrix = awq_rows(qweight, qzeros, scales, group)
    assert matrix.qtype == awq_qtype(group) and matrix.shape == (48, 256)
    want = reference.awq_dequantize(qweight, qzeros, scales, group)
    assert torch.equal(matrix.dequantize(), want)
    rows = torch.tensor([47, 0, 5])
    assert torch.equal(matrix.dequantize(rows), want[rows])
    # merging rows (q|k|v): a slice of an empty matrix filled from the layer's rows
    merged = QuantizedMatrix.empty(matrix.qtype, 96, 256)
    merged[48:].copy_(matrix)
    merged[:48].copy_(awq_rows(*awq_layer(48, 256, group, seed=1), group))
    assert torch.equal(merged.dequantize()[48:], want)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_awq_linear_meets_both_oracles(
    native_any_isa: NativeKernels, group: int, n: int, k: int
) -> None:
    layer = awq_layer(n, k, group)
    packed = pack_quantized(awq_rows(*layer, group))
    assert packed.shape == (n, k)
    w = reference.awq_dequantize(*layer, group)
    bias = randn(n, seed=2)
    for m in ROWS:
        x = randn(m, k, seed=m)
        got = quantized_linear(native_any_isa, x, packed, bias)
        exact = exact_reference(x, w) + bias.double()
        assert ((got.double() - exact).abs().max() / exact.abs().max()) < 1e-5, (group, m)
        plain = F.linear(x, w, bias)
        assert ((got - plain).norm() / plain.norm()) < FORMAT_TOL, (group, m)


def test_every_isa_gives_the_same_bits(
    native_any_isa: NativeKernels, native_kernels: NativeKernels, group: int
) -> None:
    packed = pack_quantized(awq_rows(*awq_layer(104, 512, group), group))
    x = randn(17, 512)
    want = quantized_linear(native_kernels, x, packed)
    assert torch.equal(quantized_linear(native_any_isa, x, packed), want)


def test_a_token_gets_the_same_bits_in_any_batch(native_kernels: NativeKernels) -> None:
    packed = pack_quantized(awq_rows(*awq_layer(960, 576, 64), 64))
    x = randn(64, 576)
    full = quantized_linear(native_kernels, x, packed)
    for rows in (1, 3, 8, 17):
        assert torch.equal(
            quantized_linear(native_kernels, x[:rows].contiguous(), packed), full[:rows]
        )


def test_packed_rows_are_the_layers_dequantization(
    native_any_isa: NativeKernels, group: int
) -> None:
    # an exact check of the panel layout: every value, scale and zero point in place
    layer = awq_layer(40, 256, group)
    packed = pack_quantized(awq_rows(*layer, group))
    ids = torch.arange(40)
    got = quantized_rows(native_any_isa, ids, packed)
    assert torch.equal(got, reference.awq_dequantize(*layer, group))


def test_one_group_of_all_rows() -> None:
    layer = awq_layer(32, 96, -1)
    matrix = awq_rows(*layer, -1)
    assert matrix.qtype == "AWQ_G96"
    assert torch.equal(matrix.dequantize(), reference.awq_dequantize(*layer, -1))


@pytest.mark.parametrize(("group", "bits"), [(128, 4.25), (64, 4.5), (32, 5.0)])
def test_packed_size(group: int, bits: float) -> None:
    # per 16 rows and group: group / 32 blocks of 256 nibble bytes and one 64-byte line
    # of fp16 scales and uint8 zero points; AWQ's own tensors take 4 + 20 / group bits
    n, k = 960, 1536
    layer = awq_layer(n, k, group)
    packed = pack_quantized(awq_rows(*layer, group))
    assert packed.nbytes * 8 == bits * n * k
    stored = sum(t.numel() * t.element_size() for t in layer) * 8 / (n * k)
    assert stored == pytest.approx(4 + 20 / group, rel=1e-3)
    assert bits - stored < 0.1 + 20 / group


def test_cpu_ops_take_awq_rows(native_kernels: NativeKernels) -> None:
    layer = awq_layer(104, 512, 128)
    matrix = awq_rows(*layer, 128)
    prepared = ops.prepare_linear(matrix, native=native_kernels)
    assert isinstance(prepared, QuantizedPackedWeight)
    x = randn(5, 512)
    want = reference.linear(x, matrix)  # dequantize-then-matmul
    assert torch.equal(want, F.linear(x, reference.awq_dequantize(*layer, 128)))
    got = ops.linear(x, prepared, native=native_kernels)
    assert ((got - want).norm() / want.norm()) < FORMAT_TOL
    bf16 = ops.linear(x.bfloat16(), prepared, native=native_kernels)
    assert bf16.dtype == torch.bfloat16
    assert ((bf16.float() - got).norm() / got.norm()) < FORMAT_TOL
    # Without native kernels: the reference path on the rows themselves.
    assert ops.prepare_linear(matrix) is matrix
    assert torch.equal(ops.linear(x, matrix), want)


@pytest.mark.parametrize(
    ("qtype", "known"), [("AWQ_G128", True), ("AWQ_G48", False), ("AWQ_G", False)]
)
def test_awq_types_are_whole_blocks(qtype: str, known: bool) -> None:
    assert (quantized_block(qtype) is not None) == known
    if not known:
        with pytest.raises(ValueError, match=f"GGUF type {qtype} is not kept quantized"):
            QuantizedMatrix(qtype, torch.zeros((4, 67), dtype=torch.uint8), 128)


def test_groups_that_are_not_whole_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="AWQ groups of 48 columns are not whole blocks of 32"):
        awq_qtype(48)
    # 100 input rows: a ragged last group of 4 (the loader dequantizes such a layer)
    qweight = pack(torch.randint(0, 16, (100, 8)))
    qzeros, scales = pack(torch.zeros(4, 8, dtype=torch.long)), torch.ones(4, 8).half()
    with pytest.raises(ValueError, match="100 input rows are not whole AWQ groups of 32"):
        awq_rows(qweight, qzeros, scales, 32)
