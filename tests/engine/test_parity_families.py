"""Qwen3, Phi-3, Gemma 2/3, the mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) and
the scaled rotary variants (yarn, dynamic NTK, longrope) against transformers on small
random-weight checkpoints: greedy tokens equal and logprobs within float tolerance
(float32), batched, one at a time, under a tight KV budget (preemption, chunked
prefill) and with prefix-cache hits; and the same checkpoints written as GGUF files.

The dynamic and longrope checkpoints have an original context (64) shorter than the
longest prompt plus its generation (60 + 24), so decode steps run past it, where
those variants change frequencies with the position.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kvrun.loader.dummy import dummy_weight_spec
from kvrun.models.moe import route
from kvrun.sampling_params import SamplingParams
from kvrun.testing.checkpoints import build_gguf_from_hf
from tests.support.checkpoints import cached_build
from tests.support.engine import hf_greedy, make_engine, run_all
from tests.support.logs import kvrun_log

NEW_TOKENS = 24
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(8)],
    "long_factor": [1.5 + 0.4 * i for i in range(8)],
    "original_max_position_embeddings": 64,
}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("qwen3", {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16}),
    "qwen3-tied": ("qwen3", {"num_kv_heads": 1, "head_dim": 32, "tie_word_embeddings": True}),
    "phi3": ("phi3", {"num_heads": 4, "num_kv_heads": 4}),
    "phi3-longrope": (
        "phi3",
        {
            "num_kv_heads": 2,
            "head_dim": 16,
            "rope_scaling": LONGROPE,
            "max_position_embeddings": 256,
        },
    ),
    "llama-yarn": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "max_position_embeddings": 128,
        },
    ),
    "llama-dynamic": (
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 64},
    ),
    # local layers see 8 positions: every prompt but the shortest runs past the window
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "tie_word_embeddings": True,
            "extra_config": {"query_pre_attn_scalar": 16},  # = head_dim, as in Gemma 2 9B
        },
    ),
    # a wider window, so that the local layers' own rope theta shows in the outputs
    "gemma3": (
        "gemma3",
        {
            "head_dim": 16,
            "sliding_window": 24,
            "tie_word_embeddings": True,
            "extra_config": {
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
                    "sliding_attention": {"rope_theta": 100.0, "rope_type": "default"},
                },
            },
        },
    ),
    "mixtral": ("mixtral", {"extra_config": {"num_local_experts": 4, "num_experts_per_tok": 2}}),
    # a shared expert, and layer 1 a dense MLP among mixtures
    "qwen2-moe-shared": (
        "qwen2_moe",
        {
            "extra_config": {
                "num_experts": 6,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 48,
                "shared_expert_intermediate_size": 96,
                "mlp_only_layers": [1],
            }
        },
    ),
    "qwen3-moe": (
        "qwen3_moe",
        {
            "head_dim": 16,
            "extra_config": {
                "num_experts": 8,
                "num_experts_per_tok": 3,
                "moe_intermediate_size": 32,
                "norm_topk_prob": True,
            },
        },
    ),
}
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9],
    list(range(100, 160)),
    [5, 6, 7],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
# The families outside the cpu plugin's fused decoder layout, and the word their log line
# gives as the reason; the others (the Llama arithmetic, q/k norms included) take it.
MIXTURES = ("mixtral", "qwen2-moe-shared", "qwen3-moe")
OP_BY_OP = {
    "gemma2": "gemma",
    "gemma3": "gemma",
    "mixtral": "mixture",
    "qwen2-moe-shared": "mixture",
    "qwen3-moe": "mixture",
}


# Only in the GGUF test: Gemma 3 with the rope thetas llama.cpp's format can express.
GGUF_ONLY: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3-default-rope": (
        "gemma3",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "tie_word_embeddings": True,
            "extra_config": {"query_pre_attn_scalar": 16},
        },
    ),
}


def _family_gguf(model_dir: Path, tokenizer_gguf: Path) -> Path:
    """``model_dir`` written as a GGUF file with SmolLM2's tokenizer metadata, built once
    and kept under $KVRUN_TEST_CACHE; the key holds the writer's module source and gguf-py's
    version, so a change to either writes the file anew."""
    import kvrun.testing.checkpoints as writer

    stat = tokenizer_gguf.stat()
    key = {
        "model": str(model_dir),
        "tokenizer": [str(tokenizer_gguf), stat.st_size, stat.st_mtime_ns],
        "writer": hashlib.sha256(inspect.getsource(writer).encode()).hexdigest()[:16],
        "gguf": importlib.metadata.version("gguf"),
    }

    def build(out: Path) -> Path:
        build_gguf_from_hf(model_dir, out / "model.gguf", tokenizer_gguf=tokenizer_gguf)
        return out

    return cached_build("family-gguf", key, build) / "model.gguf"


def _checkpoint(name: str, random_checkpoint: Callable[..., Path]) -> Path:
    arch, kwargs = {**MODELS, **GGUF_ONLY}[name]
    return random_checkpoint(arch, seed=11, init_std=0.3, num_layers=3, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_family_matches_transformers(name: str, random_checkpoint: Callable[..., Path]) -> None:
    model_dir = _checkpoint(name, random_checkpoint)
    reference = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    with kvrun_log(logging.INFO) as messages:
        engine = make_engine(model_dir, max_model_len=128)
    _assert_decode_path(engine, name, messages)
    for one_at_a_time in (False, True):
        outputs = run_all(engine, PROMPTS, GREEDY, one_at_a_time=one_at_a_time)
        assert [o.outputs[0].token_ids for o in outputs] == reference.tokens, one_at_a_time
        for i, out in enumerate(outputs):
            seq = out.outputs[0]
            assert seq.logprobs is not None
            for step, token in enumerate(seq.token_ids):
                assert seq.logprobs[step][token].logprob == pytest.approx(
                    reference.chosen_logprobs[i][step], abs=1e-4
                ), (i, step)
    # the second pass above hit the prefix cache for every prompt's leading blocks
    assert engine.stats().scheduler.prefix_cache_hits > 0
    # under a KV budget that holds about two sequences at once, in 16-token chunks; a
    # mixture's tokens also run through its experts in chunks of 5 (VLLM_FUSED_MOE_CHUNK_SIZE)
    moe_chunks = {"VLLM_FUSED_MOE_CHUNK_SIZE": "5"} if name in MIXTURES else {}
    tight = make_engine(
        model_dir,
        env=moe_chunks,
        max_model_len=128,
        num_kv_blocks=10,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    if name in MIXTURES:
        _assert_routes_to_every_expert(tight)
    pressured = run_all(tight, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in pressured] == reference.tokens
    assert tight.stats().scheduler.num_preemptions_total > 0


def _assert_decode_path(engine: Any, name: str, messages: list[str]) -> None:
    """Mixtures and Gemma are outside the cpu plugin's fused decoder layout: it is passed
    over with the reason logged, where Phi-3, Qwen3 and Llama take it (no such line); the
    parity of test_family_matches_transformers then covers their fused decode steps."""
    passed_over = [m for m in messages if "decode steps run op by op" in m]
    if name in OP_BY_OP:
        assert engine.runner.fused_decoder is None, name
        assert any(OP_BY_OP[name] in m for m in passed_over), (name, passed_over)
    else:
        assert engine.runner.fused_decoder is not None, name
        assert not passed_over, (name, passed_over)


def test_scaled_rope_extends_the_default_context(random_checkpoint: Callable[..., Path]) -> None:
    """yarn and dynamic stretch max_position_embeddings by their factor, as vLLM derives it."""
    yarn = make_engine(_checkpoint("llama-yarn", random_checkpoint))
    assert yarn.config.max_model_len == 32 * 4  # original context x factor
    dynamic = make_engine(_checkpoint("llama-dynamic", random_checkpoint))
    assert dynamic.config.max_model_len == 64 * 2


def _assert_routes_to_every_expert(engine: Any) -> None:
    """The parity of a mixture covers batches whose tokens go to different experts
    (checked here on the first mixture layer: PROMPTS reach every expert), and the engine
    holds VLLM_FUSED_MOE_CHUNK_SIZE=5, so its tight run chunks them (16-token steps)."""
    model = engine.runner.model
    assert model.config.moe_chunk_size == 5
    layer = next(layer for layer in model.layers if layer.moe is not None)
    ids = torch.tensor([t for prompt in PROMPTS for t in prompt])
    h = model.ops.rms_norm(model.ops.embedding(ids, model.embed), layer.input_norm, 1e-5)
    _, experts = route(model.ops, h, layer.moe, model.config)
    assert len(set(experts.flatten().tolist())) == model.config.num_experts


@pytest.mark.parametrize(
    "name",
    [
        "qwen3",
        "phi3",
        "phi3-longrope",
        "mixtral",
        "qwen2-moe-shared",
        "qwen3-moe",
        "gemma2",
        "gemma3-default-rope",
    ],
)
def test_a_gguf_of_the_family_generates_like_its_checkpoint(
    name: str, random_checkpoint: Callable[..., Path], smollm2_gguf_path: Path
) -> None:
    """The checkpoint written as llama.cpp lays it out (experts stacked per layer, Q/K
    rows permuted for llama/Mixtral, Gemma's norms as 1 + w and its scale and windows
    from the metadata), with SmolLM2's tokenizer metadata, loads to the same model:
    equal greedy tokens and logprobs."""
    model_dir = _checkpoint(name, random_checkpoint)
    path = _family_gguf(model_dir, smollm2_gguf_path)
    from_gguf = make_engine(path, max_model_len=128)
    from_checkpoint = make_engine(model_dir, max_model_len=128)
    assert from_gguf.runner.model.config.num_experts == (  # type: ignore[attr-defined]
        from_checkpoint.runner.model.config.num_experts  # type: ignore[attr-defined]
    )
    want = run_all(from_checkpoint, PROMPTS, GREEDY)
    got = run_all(from_gguf, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].cumulative_logprob == pytest.approx(
            w.outputs[0].cumulative_logprob, abs=1e-4
        )


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe-shared", "qwen3-moe", "gemma2", "phi3"])
def test_dummy_weights_are_named_and_shaped_as_the_checkpoint(
    name: str, random_checkpoint: Callable[..., Path]
) -> None:
    """load_format="dummy" makes, from config.json alone, the tensors the checkpoint
    stores (transformers keeps a mixture's experts fused in memory but saves them one
    by one), so the model loads from it and generates."""
    model_dir = _checkpoint(name, random_checkpoint)
    config = json.loads((model_dir / "config.json").read_text())
    stored = {}
    for file in model_dir.glob("*.safetensors"):
        stored.update({k: tuple(v.shape) for k, v in load_file(str(file)).items()})
    assert dict(dummy_weight_spec(config, name)) == stored
    engine = make_engine(model_dir, load_format="dummy", max_model_len=128)
    [out] = run_all(engine, PROMPTS[:1], GREEDY)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
