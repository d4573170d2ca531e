"""The fused native decode step with LoRA adapters (csrc/decoder.c calling csrc/lora.c).

With the adapter slots attached, a decode step given each token's slot must give the
hidden states and KV cache rows of the op-by-op forward with the same adapters, bit for
bit where that forward runs the native ``add_lora`` on the same kernels, and within
float tolerance of the forward with the reference ``add_lora``; on every ISA this CPU
runs. It must refuse slots it was not given and tensors it cannot read. The models,
their checkpoints and the decode batch are test_cpu_fused_decoder.py's
(tests/support/fused_decoder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.engine.batch import BatchInputs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.errors import KvrunError
from kvrun.lora.manager import LoraBatch
from kvrun.ops import reference
from kvrun_cpu.native import NativeKernels
from kvrun_cpu.native.build import find_compiler
from kvrun_cpu.native.decoder import NativeDecoder
from tests.support.fused_decoder import MODELS, decode_batch, fused_decoder_checkpoints
from tests.support.fused_decoder import make_engine as fused_engine

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on PATH")

MAX_LORAS, MAX_RANK = 3, 8
SCALES = (2.0, 0.5, 1.25)
# Against the reference add_lora (torch's matmuls, other summation orders), over two
# layers: measured differences are ~1e-6 in float32 and within a bf16 rounding step.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 6e-2, "rtol": 3e-2}}


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    return fused_decoder_checkpoints()


def make_engine(model: Path, cache_root: str, dtype: str) -> LLMEngine:
    """An engine with MAX_LORAS adapter slots of rank MAX_RANK."""
    return fused_engine(
        model,
        cache_root,
        dtype=dtype,
        enable_lora=True,
        max_loras=MAX_LORAS,
        max_lora_rank=MAX_RANK,
    )


def fill_slots(
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], scales: torch.Tensor, seed: int
) -> None:
    """Random adapters as LoraManager lays them out: each part's rank block in its own
    columns, ranks below the padded one (the rest zero), the last slot left empty."""
    g = torch.Generator().manual_seed(seed)
    for pairs in layers:
        for a, b in pairs.values():
            a.zero_()
            b.zero_()
            slots, r, k = a.shape
            n = b.shape[1]
            parts = r // MAX_RANK
            rows = [round(i * n / parts) for i in range(parts + 1)]
            for slot in range(slots - 1):
                used = MAX_RANK - slot % 3
                for part in range(parts):
                    cols = slice(part * MAX_RANK, part * MAX_RANK + used)
                    a[slot, cols] = (torch.randn(used, k, generator=g) / k**0.5).to(a.dtype)
                    block = torch.randn(rows[part + 1] - rows[part], used, generator=g) / 4
                    b[slot, rows[part] : rows[part + 1], cols] = block.to(b.dtype)
    scales.copy_(torch.tensor(SCALES))


def token_slots(m: int) -> torch.Tensor:
    """Every slot and none, mixed: -1, 0, 1, 2 (the empty slot), -1, 0, ..."""
    return torch.tensor([(i % (MAX_LORAS + 1)) - 1 for i in range(m)], dtype=torch.int64)


class Step:
    """One decode batch of an engine and its KV cache before the step, to rerun it."""

    def __init__(self, engine: LLMEngine, batch: BatchInputs) -> None:
        self.runner: Any = engine.runner
        self.batch = batch
        self.before = [c.clone() for c in self.runner.kv_caches]

    def fused(
        self, decoder: NativeDecoder, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._reset()
        b = self.batch
        with torch.inference_mode():
            hidden = decoder.run(b.input_ids, b.positions, b.meta, lora_slots=slots)
        assert hidden is not None
        return hidden, [c.clone() for c in self.runner.kv_caches]

    def eager(
        self,
        add_lora: Any,
        layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
        scales: torch.Tensor,
        slots: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._reset()
        b, caches = self.batch, self.runner.kv_caches
        lora = LoraBatch(add_lora, layers, scales, slots)
        with torch.inference_mode():
            hidden = self.runner.model.forward(b.input_ids, b.positions, caches, b.meta, lora=lora)
        return hidden, [c.clone() for c in caches]

    def _reset(self) -> None:
        for cache, saved in zip(self.runner.kv_caches, self.before, strict=True):
            cache.copy_(saved)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("prompt_lens", [[5], [16, 3, 40, 1, 2, 17, 33, 9, 64]])
def test_adapter_step_is_the_op_by_op_forward_bit_for_bit(
    checkpoints: dict[str, Path],
    shared_cache_root: str,
    model: str,
    prompt_lens: list[int],
    dtype: str,
) -> None:
    engine = make_engine(checkpoints[model], shared_cache_root, dtype)
    runner: Any = engine.runner
    decoder = runner.fused_decoder
    assert isinstance(decoder, NativeDecoder) and decoder.lora_attached  # the runner did it
    layers, scales = runner.lora.slot_tensors()
    fill_slots(layers, scales, seed=len(prompt_lens))
    step = Step(engine, decode_batch(engine, prompt_lens))
    slots = token_slots(len(prompt_lens))
    if len(prompt_lens) == 1:
        slots[0] = 1
    fused, fused_caches = step.fused(decoder, slots)
    native, native_caches = step.eager(runner.model.ops.add_lora, layers, scales, slots)
    assert torch.equal(fused, native)
    for got, want in zip(fused_caches, native_caches, strict=True):
        assert torch.equal(got, want)
    ref, _ = step.eager(reference.add_lora, layers, scales, slots)
    torch.testing.assert_close(fused, ref, **TOL[fused.dtype])
    plain, _ = step.fused(decoder, None)
    adapted = (slots >= 0) & (slots < MAX_LORAS - 1)  # the last slot is empty
    assert not torch.equal(fused[adapted], plain[adapted])  # the adapters change something
    if not adapted.all():  # a token without an adapter: as without adapters, exactly
        assert torch.equal(fused[~adapted], plain[~adapted])
    assert decoder.lora_steps == 1 and decoder.steps == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_step_on_every_isa(
    checkpoints: dict[str, Path],
    shared_cache_root: str,
    native_any_isa: NativeKernels,
    dtype: str,
) -> None:
    # Each ISA's build, on slot tensors of its own where layer 1 has adapters on q|k|v and
    # gate|up only (decoder.c skips the others), against the reference forward.
    engine = make_engine(checkpoints["qwen2-d64"], shared_cache_root, dtype)
    runner: Any = engine.runner
    manager_layers, scales = runner.lora.slot_tensors()
    layers = [
        {name: (a.clone(), b.clone()) for name, (a, b) in pairs.items()} for pairs in manager_layers
    ]
    scales = scales.clone()
    fill_slots(layers, scales, seed=7)
    for name in ("o", "down"):  # zero for the forward, which adds them all; absent here
        for t in layers[1][name]:
            t.zero_()
    partial = [layers[0], {n: layers[1][n] for n in ("qkv", "gate_up")}]
    decoder = NativeDecoder(native_any_isa, runner.model, runner.kv_caches, max_tokens=8)
    assert decoder.attach_lora(partial, scales) is None
    step = Step(engine, decode_batch(engine, [5, 16, 3, 40, 9, 1, 2]))
    slots = token_slots(7)
    fused, fused_caches = step.fused(decoder, slots)
    ref, ref_caches = step.eager(reference.add_lora, layers, scales, slots)
    torch.testing.assert_close(fused, ref, **TOL[fused.dtype])
    for got, want in zip(fused_caches, ref_caches, strict=True):
        torch.testing.assert_close(got, want, **TOL[fused.dtype])
    plain, _ = step.fused(decoder, None)
    none, _ = step.fused(decoder, torch.full((7,), -1))
    assert torch.equal(none, plain)  # no token with an adapter: the step without them
    assert not torch.equal(fused, plain)


def test_refuses_slots_it_was_not_given(
    checkpoints: dict[str, Path], shared_cache_root: str, native_kernels: NativeKernels
) -> None:
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root, "float32")
    runner: Any = engine.runner
    batch = decode_batch(engine, [4, 5, 6])
    decoder = runner.fused_decoder
    assert isinstance(decoder, NativeDecoder)
    ids, pos, meta = batch.input_ids, batch.positions, batch.meta
    with pytest.raises(KvrunError, match=r"^native decode step: row 2: LoRA slot outside"):
        decoder.run(ids, pos, meta, lora_slots=torch.tensor([0, -1, MAX_LORAS]))
    with pytest.raises(KvrunError, match=r"^native decode step: row 0: LoRA slot outside"):
        decoder.run(ids, pos, meta, lora_slots=torch.tensor([-2, -1, 0]))
    # not the step's shape or dtype, or no slots attached: not a step it takes
    assert decoder.run(ids, pos, meta, lora_slots=torch.tensor([0, 1])) is None
    assert (
        decoder.run(ids, pos, meta, lora_slots=torch.tensor([0, 1, 2], dtype=torch.int32)) is None
    )
    bare = NativeDecoder(native_kernels, runner.model, runner.kv_caches, max_tokens=4)
    assert not bare.lora_attached
    assert bare.run(ids, pos, meta, lora_slots=torch.tensor([0, -1, 1])) is None
    assert bare.steps == 0


def test_refuses_slot_tensors_it_cannot_read(
    checkpoints: dict[str, Path], shared_cache_root: str, native_kernels: NativeKernels
) -> None:
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root, "float32")
    runner: Any = engine.runner
    layers, scales = runner.lora.slot_tensors()
    decoder = NativeDecoder(native_kernels, runner.model, runner.kv_caches, max_tokens=4)

    def with_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> list[dict[str, Any]]:
        return [{**layers[0], name: (a, b)}, layers[1]]

    a, b = layers[0]["o"]
    assert decoder.attach_lora(layers[:1], scales) == "the adapters have 1 layers, the model 2"
    assert decoder.attach_lora(layers, scales.double()) == (
        "the adapter scales are not a contiguous float32 vector"
    )
    assert decoder.attach_lora(with_pair("lm_head", a, b), scales) == (
        "layer 0's adapters change lm_head, which decoder.c does not"
    )
    bad = (
        "layer 0's o adapters are not [slots, rank, in] and [slots, out, rank] contiguous "
        "tensors in float32"
    )
    assert decoder.attach_lora(with_pair("o", a.bfloat16(), b.bfloat16()), scales) == bad
    assert decoder.attach_lora(with_pair("o", a.transpose(1, 2), b), scales) == bad
    assert decoder.attach_lora(with_pair("o", a[:, :4], b), scales) == bad
    assert not decoder.lora_attached
    assert decoder.attach_lora(layers, scales) is None and decoder.lora_attached
