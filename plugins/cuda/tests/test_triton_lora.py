"""The Triton add_lora (kvrun_cuda.triton.lora) against the core's reference op, in
Triton's interpreter on CPU (and compiled on an NVIDIA GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.ops import reference as ref
from kvrun_cuda.triton.lora import add_lora
from kvrun_cuda.triton.ops import triton_ops

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(
    tokens: int, dtype: torch.dtype, device: torch.device, *, n: int, k: int, rank: int
) -> tuple[torch.Tensor, ...]:
    """Slot buffers as LoraManager fills them: two parts, each its rank block in its own
    columns, ranks below the padded one zero, the last of 3 slots empty."""
    g = torch.Generator().manual_seed(tokens)
    num_slots, r = 3, 2 * rank
    a, b = torch.zeros(num_slots, r, k), torch.zeros(num_slots, n, r)
    half = n // 2
    for slot in range(num_slots - 1):
        used = rank - slot
        for part, rows in enumerate((slice(0, half), slice(half, n))):
            cols = slice(part * rank, part * rank + used)
            a[slot, cols] = torch.randn(used, k, generator=g) / k**0.5
            b[slot, rows, cols] = torch.randn(rows.stop - rows.start, used, generator=g)
    y, x = torch.randn(tokens, n, generator=g), torch.randn(tokens, k, generator=g)
    scales = torch.tensor([2.0, 0.5, 1.0])
    slots = torch.randint(-1, num_slots, (tokens,), generator=g)
    if tokens > 1:
        slots[0], slots[1] = -1, 0
    tensors = (y.to(dtype), x.to(dtype), a.to(dtype), b.to(dtype))
    return *(t.to(device) for t in tensors), scales.to(device), slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_add_lora_matches_the_reference(
    device: torch.device, dtype: torch.dtype, tokens: int
) -> None:
    # n = 200: two blocks of output columns, the second partial; k = 150: two partial
    # steps of the shrink; rank 6 of 8 padded (BLOCK_R = 16 > R = 12).
    y, x, a, b, scales, slots = _inputs(tokens, dtype, device, n=200, k=150, rank=6)
    y_before = y.clone()
    got = add_lora(y, x, a, b, scales, slots)
    want = ref.add_lora(y, x, a, b, scales, slots)
    tol = TOLERANCE[dtype]
    assert got.dtype == dtype and got.shape == y.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    none = slots < 0
    assert torch.equal(got[none], y[none])  # no adapter: y exactly
    assert torch.equal(y, y_before)
    adapted = (slots >= 0) & (slots < 2)
    assert not torch.equal(got[adapted], y[adapted])


def test_strided_inputs_and_the_op_table(device: torch.device) -> None:
    y, x, a, b, scales, slots = _inputs(4, torch.float32, device, n=40, k=24, rank=4)
    wide = torch.zeros(4, 100, device=device)
    wide[:, 30:70] = y
    got = triton_ops()["add_lora"](wide[:, 30:70], x, a, b, scales, slots)
    torch.testing.assert_close(got, ref.add_lora(y, x, a, b, scales, slots), rtol=1e-5, atol=1e-5)
