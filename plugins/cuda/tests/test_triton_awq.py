"""The Triton AWQ dequantisation (VLLM_USE_TRITON_AWQ) against the core's reference op.

In Triton's interpreter on CPU, and compiled on an NVIDIA GPU when there is one. The
result is one float32 multiply of exact values, so it must equal the reference bit
for bit, whatever the scales' dtype.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.loader.awq import AwqConfig, merge_awq
from kvrun.ops import reference as ref
from kvrun_cuda.triton.awq import awq_dequantize


def awq_layer(
    rows: int, cols: int, group_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, qzeros, scales) of random words: every nibble, the sign bit included."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-rows // group_size)
    words = cols // 8
    qweight = torch.randint(-(2**31), 2**31, (rows, words), generator=g).to(torch.int32)
    qzeros = torch.randint(-(2**31), 2**31, (groups, words), generator=g).to(torch.int32)
    scales = (0.001 + 0.01 * torch.rand(groups, cols, generator=g)).to(dtype)
    return qweight, qzeros, scales


@pytest.mark.parametrize(
    ("rows", "cols", "group_size"),
    [(128, 64, 128), (64, 136, 32), (100, 72, 16), (48, 8, -1)],
    ids=["one-tile", "more-columns-than-a-tile", "ragged-rows-and-groups", "one-group"],
)
@pytest.mark.parametrize("scales_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_dequantisation_equals_the_reference_bit_for_bit(
    device: torch.device, rows: int, cols: int, group_size: int, scales_dtype: torch.dtype
) -> None:
    parts = awq_layer(rows, cols, group_size, scales_dtype, seed=rows + cols)
    on_device = [p.to(device) for p in parts]
    got = awq_dequantize(*on_device, group_size)
    assert got.shape == (cols, rows) and got.dtype == torch.float32
    assert got.device.type == device.type
    assert torch.equal(got.cpu(), ref.awq_dequantize(*parts, group_size))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device, parts))  # inputs untouched


def test_the_loader_makes_the_same_weights_with_the_triton_op(device: torch.device) -> None:
    """merge_awq with the Triton op on the device gives the reference's weights there."""
    stored = [("model.norm.weight", torch.ones(64, dtype=torch.float16))]
    for name, (rows, cols) in {"q_proj": (64, 64), "down_proj": (128, 64)}.items():
        for part, tensor in zip(
            ("scales", "qzeros", "qweight"),
            reversed(awq_layer(rows, cols, 32, torch.float16, len(name))),
        ):
            stored.append((f"model.layers.0.{name}.{part}", tensor))
    config = AwqConfig(group_size=32)
    want = dict(merge_awq(stored, config, torch.float16, "awq-test"))
    got = dict(merge_awq(stored, config, torch.float16, "awq-test", awq_dequantize, device))
    assert (
        sorted(got)
        == sorted(want)
        == [
            "model.layers.0.down_proj.weight",
            "model.layers.0.q_proj.weight",
            "model.norm.weight",
        ]
    )
    for name, tensor in want.items():
        if name.endswith("proj.weight"):
            assert got[name].device.type == device.type
        assert got[name].dtype == torch.float16 and torch.equal(got[name].cpu(), tensor)
