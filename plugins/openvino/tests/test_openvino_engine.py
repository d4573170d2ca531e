"""kvrun-openvino end to end: the compiled paged graph under kvrun's own scheduler.

Greedy output must equal Hugging Face transformers' (and so the cpu plugin's) on a
tiny random Llama and on SmolLM2, through mixed prefill/decode batches, prefix-cache
hits and forced preemption. The IR is exported once into the test cache and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.engine.batch import logits_rows
from kvrun.engine.llm_engine import LLMEngine
from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_random import MODELS, NEW_TOKENS, PROMPTS
from tests.support.checkpoints import cache_root
from tests.support.engine import Reference, hf_greedy, make_engine, run_all

pytest.importorskip("openvino")

from kvrun_openvino import probe
from kvrun_openvino.executor import paged_inputs

RANDOM_PROMPTS = [
    [1, 5, 9, 200, 33],
    [1, *[7] * 40, 100, 3],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    [1, *range(300, 370)],
]
RANDOM_TOKENS = 24


def ov_engine(model: object, env: dict[str, str] | None = None, **kwargs: Any) -> LLMEngine:
    """An engine on the openvino platform, its IR cached beside the test checkpoints."""
    environ = {
        "VLLM_TARGET_DEVICE": "openvino",
        "VLLM_CACHE_ROOT": str(cache_root() / "openvino-cache"),
        **(env or {}),
    }
    return make_engine(model, environ, **kwargs)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tokens(engine: LLMEngine, prompts: list[list[int]], n: int, **kw: Any) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in run_all(engine, prompts, greedy(n), **kw)]


@pytest.fixture(scope="module")
def llama_dir(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=0)


@pytest.fixture(scope="module")
def llama_reference(llama_dir: Path) -> Reference:
    return hf_greedy(llama_dir, RANDOM_PROMPTS, RANDOM_TOKENS)


def test_probe_finds_openvino_here() -> None:
    assert probe() == "kvrun_openvino.platform.OpenvinoPlatform"


def test_paged_inputs_from_the_flat_batch() -> None:
    # Two sequences: one decoding its 35th token (2 blocks), one prefilling 3 tokens
    # after a 2-token prefix-cache hit (1 block). Blocks of 32 tokens.
    meta = AttentionMetadata(
        num_tokens=4,
        slot_mapping=torch.tensor([7 * 32 + 2, 4 * 32 + 2, 4 * 32 + 3, 4 * 32 + 4]),
        query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32),
        seq_lens=torch.tensor([35, 5], dtype=torch.int32),
        block_tables=torch.tensor([[3, 7], [4, 0]], dtype=torch.int32),
        query_lens=[1, 3],
        seq_lens_host=[35, 5],
        block_size=32,
        max_query_len=3,
        max_seq_len=35,
    )
    ids = torch.tensor([11, 12, 13, 14])
    got = paged_inputs(ids, torch.tensor([34, 2, 3, 4]), meta, torch.tensor([0, 3]))
    assert {k: v.tolist() for k, v in got.items()} == {
        "input_ids": [11, 12, 13, 14],
        "position_ids": [34, 2, 3, 4],
        "past_lens": [34, 2],
        "subsequence_begins": [0, 1, 4],
        "block_indices": [3, 7, 4],  # the padding 0 of the second table is not sent
        "block_indices_begins": [0, 2, 3],
        "max_context_len": 35,
        "logits_indices": [0, 3],
    }
    assert got["past_lens"].dtype.name == "int32" and got["max_context_len"].shape == ()


def test_logits_rows_put_sampling_rows_first() -> None:
    assert logits_rows([4, 9], [(0, 5), (7, 10)]) == (
        [4, 9, 0, 1, 2, 3, 4, 7, 8, 9],
        [(2, 7), (7, 10)],
    )


def test_random_llama_matches_transformers_and_cpu(
    llama_dir: Path, llama_reference: Reference
) -> None:
    engine = ov_engine(llama_dir, num_kv_blocks=64)
    assert engine.config.block_size == 32  # the CPU plugin's paged-attention block
    got = tokens(engine, RANDOM_PROMPTS, RANDOM_TOKENS)
    assert got == llama_reference.tokens
    cpu = tokens(make_engine(llama_dir), RANDOM_PROMPTS, RANDOM_TOKENS)
    assert got == cpu


def test_random_llama_mixed_batches_and_preemption(
    llama_dir: Path, llama_reference: Reference
) -> None:
    # 8-token chunks put prefill chunks beside running decodes in every early step.
    mixed = ov_engine(llama_dir, num_kv_blocks=64, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens(mixed, RANDOM_PROMPTS, RANDOM_TOKENS) == llama_reference.tokens
    # 4 blocks of 32 hold the longest sequence (95 tokens) but not all four at once.
    tiny = ov_engine(llama_dir, num_kv_blocks=4, max_model_len=128)
    assert tokens(tiny, RANDOM_PROMPTS, RANDOM_TOKENS) == llama_reference.tokens
    assert tiny.stats().scheduler.num_preemptions_total > 0


@pytest.mark.parametrize("name", ["llama3-rope-scaling-tied", "qwen2-bias-sharded", "mistral"])
def test_other_random_models_match_transformers(
    name: str, random_checkpoint: Callable[..., Path]
) -> None:
    # The core's own parity models (tests/engine/test_parity_random.py), same reference.
    arch, kwargs = MODELS[name]
    model_dir = random_checkpoint(arch, seed=7, init_std=0.3, num_layers=3, **kwargs)
    expected = hf_greedy(model_dir, PROMPTS, NEW_TOKENS).tokens
    engine = ov_engine(
        model_dir, num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4
    )
    assert tokens(engine, PROMPTS, NEW_TOKENS) == expected


def test_prompt_logprobs_match_the_cpu_platform(llama_dir: Path) -> None:
    # Prompt logprobs need logits for every row of a chunk; 8-token chunks split the
    # prompts, so rows from several chunks of one request are stitched together.
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, logprobs=2)
    kwargs: dict[str, Any] = {"max_num_batched_tokens": 8, "max_num_seqs": 2}
    ov = run_all(ov_engine(llama_dir, num_kv_blocks=64, **kwargs), RANDOM_PROMPTS[:2], params)
    cpu = run_all(make_engine(llama_dir, **kwargs), RANDOM_PROMPTS[:2], params)
    for a, b in zip(ov, cpu, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for got, want in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert got is not None and want is not None
            assert sorted(got) == sorted(want)
            for token, entry in want.items():
                assert got[token].rank == entry.rank
                assert got[token].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_float16_matches_float32_on_every_cpu(llama_dir: Path) -> None:
    # On an AVX512_FP16 CPU the plugin's own f16 paged attention gave NaN logits from
    # prompts of ~18 tokens; float16 now computes in f32 over an f16 cache, so its
    # logprobs differ from float32's only by the cache's rounding, on either CPU.
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True)
    f16_engine = ov_engine(llama_dir, dtype="float16", num_kv_blocks=16, max_model_len=256)
    # 2 layers x (K + V) x [2 heads, 32 tokens, 16] in 2-byte floats.
    assert f16_engine.config.kv_cache_bytes == 16 * 2 * 2 * (2 * 32 * 16) * 2
    f16 = run_all(f16_engine, RANDOM_PROMPTS, params)
    f32 = run_all(ov_engine(llama_dir, num_kv_blocks=16, max_model_len=256), RANDOM_PROMPTS, params)
    for a, b in zip(f16, f32, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs is not None and b.outputs[0].logprobs is not None
        for got, want in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for token, entry in want.items():
                assert got[token].logprob == pytest.approx(entry.logprob, abs=2e-2)


def test_kv_budget_and_u8_cache_read_back(llama_dir: Path) -> None:
    # f32 cache, 2 layers x (K + V) x [2 heads, 32 tokens, 16]: 16384 bytes a block.
    f32 = ov_engine(llama_dir, {"VLLM_OPENVINO_KVCACHE_SPACE": "1"})
    assert (f32.config.num_kv_blocks, f32.config.kv_cache_bytes) == (65536, 1 << 30)
    # u8 keys carry 8 rows of scales ([2, 40, 16]), values 8 columns ([2, 32, 24]).
    u8 = ov_engine(
        llama_dir,
        {"VLLM_OPENVINO_CPU_KV_CACHE_PRECISION": "u8"},
        num_kv_blocks=8,
        max_model_len=256,
    )
    assert u8.config.kv_cache_bytes == 8 * 2 * (2 * 40 * 16 + 2 * 32 * 24)
    assert len(tokens(u8, RANDOM_PROMPTS[:1], 4)[0]) == 4


def test_smollm2_matches_transformers(
    smollm2_hf_dir: Path, prompts: list[list[int]], reference: Reference
) -> None:
    few = prompts[:6]
    expected = [t[:32] for t in reference.tokens[:6]]
    engine = ov_engine(smollm2_hf_dir, max_num_batched_tokens=64, max_num_seqs=6)
    assert tokens(engine, few, 32) == expected
    # The same prompts again, one at a time: their blocks come from the prefix cache.
    again = run_all(engine, few, greedy(32), one_at_a_time=True)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens >= 32 for o, p in zip(again, few) if len(p) >= 64)
    assert engine.stats().scheduler.prefix_cache_hits > 0


def test_smollm2_preemption(
    smollm2_hf_dir: Path, prompts: list[list[int]], reference: Reference
) -> None:
    engine = ov_engine(smollm2_hf_dir, num_kv_blocks=6, max_model_len=192, max_num_seqs=6)
    assert tokens(engine, prompts[:6], 32) == [t[:32] for t in reference.tokens[:6]]
    assert engine.stats().scheduler.num_preemptions_total > 0


def _checkpoint(path: Path) -> tuple[Any, Any]:
    from kvrun.loader import load_checkpoint
    from kvrun.models.config import ModelConfig

    checkpoint = load_checkpoint(str(path), hf_hub_offline=True, use_modelscope=False)
    return checkpoint, ModelConfig.from_hf(checkpoint.hf_config, str(path))


def test_ir_is_exported_once_per_checkpoint_and_options(llama_dir: Path, tmp_path: Path) -> None:
    from kvrun_openvino.export import ExportOptions, export_ir

    checkpoint, model = _checkpoint(llama_dir)
    first = export_ir(checkpoint, model, ExportOptions(int8_weights=False), str(tmp_path))
    stamp = first.stat().st_mtime_ns
    again = export_ir(checkpoint, model, ExportOptions(int8_weights=False), str(tmp_path))
    assert (again, again.stat().st_mtime_ns) == (first, stamp)
    assert first.parent.parent == tmp_path / "openvino"
    # No scratch directory is left behind.
    assert [p.name for p in (tmp_path / "openvino").iterdir()] == [first.parent.name]


def test_int8_weights_export(llama_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    import openvino

    engine = ov_engine(
        llama_dir,
        {"VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS": "1", "VLLM_CACHE_ROOT": str(tmp_path)},
        num_kv_blocks=8,
        max_model_len=256,
    )
    assert len(tokens(engine, RANDOM_PROMPTS[:1], 4)[0]) == 4
    (ir,) = (tmp_path / "openvino").glob("*/model.xml")
    ov_model = openvino.Core().read_model(ir)
    int8 = {
        op.get_friendly_name().removeprefix("self.w.")
        for op in ov_model.get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "u8"
    }
    # Every linear weight, the embedding and (untied here) lm_head, each with a zero point.
    linears = [f"{m}_proj" for m in ("self_attn__q", "self_attn__k", "self_attn__v")]
    linears += ["self_attn__o_proj", "mlp__gate_proj", "mlp__up_proj", "mlp__down_proj"]
    weights = ["embed_tokens__weight", "lm_head__weight"] + [
        f"layers__{i}__{m}__weight" for i in (0, 1) for m in linears
    ]
    assert int8 == set(weights) | {f"{w}/zero_point" for w in weights}


def test_gguf_file_exports_through_kvrun_loader(
    smollm2_gguf_path: Path, prompts: list[list[int]], reference: Reference
) -> None:
    # The exporter reads weights through kvrun's loader, so a GGUF-only model needs no
    # Hugging Face directory: its dequantized weights are what transformers loads too.
    engine = ov_engine(smollm2_gguf_path, num_kv_blocks=16, max_model_len=256)
    assert tokens(engine, prompts[:2], 16) == [t[:16] for t in reference.tokens[:2]]
