"""The native batched LoRA (csrc/lora.c) against the reference op, on every ISA this CPU
runs, and the cpu op table's add_lora."""

from __future__ import annotations

import pytest
import torch

from kvrun.ops import reference
from kvrun_cpu.native import NativeKernels
from kvrun_cpu.ops import cpu_ops

# Sums of up to 576 + 48 terms in another order than torch's matmul.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _inputs(
    tokens: int,
    dtype: torch.dtype,
    *,
    n: int = 100,
    k: int = 72,
    rank: int = 8,
    parts: int = 2,
    num_slots: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Slot buffers as LoraManager fills them: each part's rank block in its own columns
    of A's rows and B's columns, ranks below the padded one zero, one slot left empty."""
    g = torch.Generator().manual_seed(seed)
    r = parts * rank
    a = torch.zeros(num_slots, r, k)
    b = torch.zeros(num_slots, n, r)
    rows = [round(i * n / parts) for i in range(parts + 1)]
    for slot in range(num_slots - 1):  # the last slot stays empty (all zero)
        used = rank - slot % 3  # adapters of rank below the padded one
        for part in range(parts):
            cols = slice(part * rank, part * rank + used)
            a[slot, cols] = torch.randn(used, k, generator=g) / k**0.5
            b[slot, rows[part] : rows[part + 1], cols] = torch.randn(
                rows[part + 1] - rows[part], used, generator=g
            )
    y = torch.randn(tokens, n, generator=g)
    x = torch.randn(tokens, k, generator=g)
    scales = torch.tensor([2.0, 0.5, 1.25, 1.0][:num_slots], dtype=torch.float32)
    slots = torch.randint(-1, num_slots, (tokens,), generator=g)
    if tokens > 1:
        slots[0] = -1  # every case mixes tokens with no adapter ...
        slots[1] = 0  # ... and with one
    return y.to(dtype), x.to(dtype), a.to(dtype), b.to(dtype), scales, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize(("n", "k", "rank", "parts"), [(100, 72, 8, 2), (960, 576, 16, 3)])
def test_add_lora_matches_the_reference(
    native_any_isa: NativeKernels,
    dtype: torch.dtype,
    tokens: int,
    n: int,
    k: int,
    rank: int,
    parts: int,
) -> None:
    y, x, a, b, scales, slots = _inputs(tokens, dtype, n=n, k=k, rank=rank, parts=parts)
    y_before = y.clone()
    got = native_any_isa.add_lora(y, x, a, b, scales, slots)
    want = reference.add_lora(y, x, a, b, scales, slots)
    assert got.dtype == dtype and got.shape == y.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    none = slots < 0
    assert torch.equal(got[none], y[none])  # no adapter: y exactly
    assert torch.equal(y, y_before)  # the input is not written
    adapted = (slots >= 0) & (slots < 3)  # the empty slot (3) adds nothing either
    if adapted.any():
        assert not torch.equal(got[adapted], y[adapted])


@pytest.mark.parametrize("slot", [1, 0])
def test_one_token_one_slot(native_kernels: NativeKernels, slot: int) -> None:
    y, x, a, b, scales, _ = _inputs(1, torch.float32)
    slots = torch.tensor([slot])
    torch.testing.assert_close(
        native_kernels.add_lora(y, x, a, b, scales, slots),
        reference.add_lora(y, x, a, b, scales, slots),
        **TOL[torch.float32],
    )


def test_strided_rows_and_all_without_adapter(native_kernels: NativeKernels) -> None:
    y, x, a, b, scales, slots = _inputs(9, torch.float32, n=64, k=48)
    wide = torch.randn(9, 200)
    wide[:, 10:74] = y
    y_view = wide[:, 10:74]  # rows 200 apart, as a slice of a fused qkv output
    x_wide = torch.randn(9, 100)
    x_wide[:, :48] = x
    x_view = x_wide[:, :48]
    torch.testing.assert_close(
        native_kernels.add_lora(y_view, x_view, a, b, scales, slots),
        reference.add_lora(y, x, a, b, scales, slots),
        **TOL[torch.float32],
    )
    none = torch.full((9,), -1)
    assert torch.equal(native_kernels.add_lora(y_view, x_view, a, b, scales, none), y)


def test_a_slot_outside_the_buffers_is_refused(native_kernels: NativeKernels) -> None:
    y, x, a, b, scales, _ = _inputs(3, torch.float32)
    with pytest.raises(IndexError, match=r"^slot 4 of token 2 is outside the 4 LoRA slots"):
        native_kernels.add_lora(y, x, a, b, scales, torch.tensor([0, -1, 4]))
    with pytest.raises(IndexError, match=r"^slot -2 of token 0 "):
        native_kernels.add_lora(y, x, a, b, scales, torch.tensor([-2, -1, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_op_table_runs_it(native_kernels: NativeKernels, dtype: torch.dtype) -> None:
    # float16 (not a native dtype) goes to the reference; the others to the kernel.
    y, x, a, b, scales, slots = _inputs(7, dtype)
    op = cpu_ops(native_kernels)["add_lora"]
    tol = TOL.get(dtype, {"atol": 1e-2, "rtol": 1e-2})
    want = reference.add_lora(y.float(), x.float(), a.float(), b.float(), scales, slots)
    torch.testing.assert_close(op(y, x, a, b, scales, slots).float(), want, **tol)
    assert cpu_ops()["add_lora"](y, x, a, b, scales, slots).dtype == dtype
