"""The fused native decode step against the op-by-op forward it replaces.

The decoder must give the same hidden states bit for bit and write the same KV cache
rows, for every batch it takes; it must decline what it does not take and refuse input
its C code would otherwise read out of bounds. Checkpoints, engines and the decode batch:
tests/support/fused_decoder.py (shared with test_cpu_fused_decoder_lora.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.engine.batch import build_batch
from kvrun.errors import KvrunError
from kvrun.models.layout import DECODER_LAYOUT
from kvrun.sampling_params import SamplingParams
from kvrun_cpu.native import NativeKernels
from kvrun_cpu.native.build import find_compiler
from kvrun_cpu.native.decoder import NativeDecoder, unsupported_reason
from tests.support.fused_decoder import (
    MODELS,
    decode_batch,
    fused_decoder_checkpoints,
    make_engine,
)

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on PATH")


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    return fused_decoder_checkpoints()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("prompt_lens", [[5], [16, 3, 40], [1, 2, 17, 33, 9, 16, 64, 8]])
def test_fused_step_is_the_forward_bit_for_bit(
    checkpoints: dict[str, Path],
    shared_cache_root: str,
    model: str,
    prompt_lens: list[int],
    dtype: str,
) -> None:
    engine = make_engine(checkpoints[model], shared_cache_root, dtype=dtype)
    runner = engine.runner
    assert isinstance(runner.fused_decoder, NativeDecoder)
    assert runner.model is not None
    batch = decode_batch(engine, prompt_lens)
    before = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        fused = runner.fused_decoder.run(batch.input_ids, batch.positions, batch.meta)
        fused_caches = [c.clone() for c in runner.kv_caches]
        for cache, saved in zip(runner.kv_caches, before, strict=True):
            cache.copy_(saved)
        eager = runner.model.forward(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
    assert fused is not None and torch.equal(fused, eager)
    for got, want in zip(fused_caches, runner.kv_caches, strict=True):
        assert torch.equal(got, want)
    assert not all(torch.equal(c, b) for c, b in zip(runner.kv_caches, before))  # it wrote


def test_declines_prefills_and_steps_beyond_its_scratch(
    checkpoints: dict[str, Path], shared_cache_root: str, native_kernels: NativeKernels
) -> None:
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root, max_num_seqs=5)
    decoder = engine.runner.fused_decoder
    assert isinstance(decoder, NativeDecoder) and decoder.max_tokens == 5
    engine.add_request("p", [11, 12, 13], SamplingParams(max_tokens=2))
    out = engine.scheduler.schedule()
    prefill = build_batch(out.chunks, engine.config.block_size, engine.platform.device)
    assert decoder.run(prefill.input_ids, prefill.positions, prefill.meta) is None
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root)
    runner = engine.runner
    small = NativeDecoder(native_kernels, runner.model, runner.kv_caches, max_tokens=2)
    batch = decode_batch(engine, [3, 4, 5])
    assert small.run(batch.input_ids, batch.positions, batch.meta) is None


def test_refuses_a_slot_outside_the_cache(
    checkpoints: dict[str, Path], shared_cache_root: str
) -> None:
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root)
    decoder = engine.runner.fused_decoder
    assert decoder is not None
    batch = decode_batch(engine, [4, 5])
    batch.meta.slot_mapping[1] = 64 * engine.config.block_size
    with pytest.raises(KvrunError, match=r"^native decode step: row 1: cache slot outside"):
        decoder.run(batch.input_ids, batch.positions, batch.meta)


def test_generation_is_the_same_with_and_without_it(
    checkpoints: dict[str, Path], shared_cache_root: str
) -> None:
    def generate(fused: bool) -> list[list[int]]:
        engine = make_engine(checkpoints["qwen2-d64"], shared_cache_root)
        if not fused:
            engine.runner.fused_decoder = None
        params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
        for i in range(3):
            engine.add_request(f"r{i}", [20 + i, 30, 40 + 5 * i], params)
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for delta in engine.step():
                for seq in delta.sequences:
                    done.setdefault(delta.request_id, []).extend(seq.token_ids)
        return [done[f"r{i}"] for i in range(3)]

    assert generate(fused=True) == generate(fused=False)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"dtype": "float16"}, "the model runs in float16, not float32 or bfloat16"),
        ({"attention_backend": "REFERENCE"}, "the attention backend is REFERENCE, not TORCH_SDPA"),
    ],
)
def test_models_it_does_not_take_run_op_by_op(
    checkpoints: dict[str, Path],
    shared_cache_root: str,
    caplog: pytest.LogCaptureFixture,
    kwargs: dict[str, str],
    reason: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="kvrun.cpu"):
        engine = make_engine(checkpoints["llama-d16"], shared_cache_root, **kwargs)
    assert engine.runner.fused_decoder is None
    assert f"decode steps run op by op: {reason}" in caplog.messages


def test_the_engine_reuses_free_blocks_most_recently_freed_first(
    checkpoints: dict[str, Path], shared_cache_root: str
) -> None:
    # Not the decoder's, but the same engines: a freed block's pages are warm, a fresh
    # one pays first-touch page faults in the calloc'd cache.
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root)
    policy = engine.scheduler.block_manager.free_block_policy
    assert policy.name == "most-recently-freed-first"
    engine.add_request("a", list(range(10, 50)), SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("b", list(range(10, 30)), SamplingParams(max_tokens=2))
    engine.step()
    # a held blocks 0..2 and freed them tail first; b gets them back head first.
    assert engine.scheduler.block_manager.block_table("b") == [0, 1]


def test_the_decoder_reads_only_models_that_declare_its_layout(
    checkpoints: dict[str, Path], shared_cache_root: str
) -> None:
    engine = make_engine(checkpoints["llama-d16"], shared_cache_root)
    runner: Any = engine.runner
    model = runner.model
    assert unsupported_reason(model, runner.kv_caches) is None
    assert model.decoder_layout == DECODER_LAYOUT

    class Capped(type(model)):  # type: ignore[misc]
        """A family whose arithmetic differs (say, soft-capped logits)."""

        decoder_layout = "capped-v1"

    model.__class__ = Capped
    assert unsupported_reason(model, runner.kv_caches) == (
        f"Capped does not declare kvrun's fused-decoder layout {DECODER_LAYOUT} "
        "(it declares 'capped-v1')"
    )
    model.__class__ = Capped.__mro__[1]
    del model.layers[1].qkv_bias
    assert unsupported_reason(model, runner.kv_caches) == (
        f"LlamaForCausalLM declares {DECODER_LAYOUT} but lacks layers[].qkv_bias"
    )
