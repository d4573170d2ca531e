"""Tensor and pipeline parallelism of the mixtures (Mixtral, Qwen2-MoE, Qwen3-MoE), Gemma
2/3 and DeepSeek-V2/V3 with real ranks (Workers in their own processes over gloo, inside
a network namespace of their own), on the random float32 checkpoints of the family
parity tests (tests/engine/test_parity_families.py, test_parity_mla.py,
test_parity_deepseek_v3.py: the same checkpoints, prompts and cached transformers
references).

The oracle is the same Worker at tensor_parallel_size=1 (the in-process engine's
arithmetic, which the parity tests check against transformers): pipeline stages equal it
bit for bit; tensor parallelism (experts split by their intermediate dimension, MLA
heads split with the latent replicated, Gemma's heads and MLP split with soft-capping
and windows per rank) sums in another order, so its logits agree within 1e-4 and its
greedy tokens equal the oracle's except at a near-tie, which the test reports. Both are
also checked against transformers' greedy tokens and chosen logprobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.distributed.parallel import ParallelConfig, ShardLayout, shard_weights
from kvrun.errors import ConfigError
from kvrun.models.config import ModelConfig
from tests.distributed.rank_jobs import (
    NEEDS_NAMESPACE,
    assert_pipeline_identical,
    compare_tensor_parallel,
    job,
    ok,
)
from tests.engine import test_parity_deepseek_v3 as v3_parity
from tests.engine import test_parity_families as families
from tests.engine import test_parity_mla as mla_parity
from tests.support.engine import hf_greedy

pytestmark = NEEDS_NAMESPACE

MAX_TOKENS = 8  # the first tokens of the parity tests' cached references
TP_TOLERANCE = 1e-4
# family -> (its parity test's checkpoint name, that test's prompts and reference length)
FAMILIES: dict[str, tuple[str, list[list[int]], int]] = {
    "mixtral": ("mixtral", families.PROMPTS, families.NEW_TOKENS),
    "qwen2_moe": ("qwen2-moe-shared", families.PROMPTS, families.NEW_TOKENS),
    "qwen3_moe": ("qwen3-moe", families.PROMPTS, families.NEW_TOKENS),
    "gemma2": ("gemma2", families.PROMPTS, families.NEW_TOKENS),
    "gemma3": ("gemma3", families.PROMPTS, families.NEW_TOKENS),
    "deepseek_v2": ("v2-lite-shaped", mla_parity.PROMPTS, mla_parity.NEW_TOKENS),
    "deepseek_v3": ("v3-shaped", v3_parity.PROMPTS, v3_parity.NEW_TOKENS),
}
# DeepSeek-V2's other attention modes (tests/engine/test_parity_mla.py), at tp=2
MLA_MODES = {
    "per-step": {"VLLM_MLA_PERFORM_MATRIX_ABSORPTION": "0"},  # W_UK/W_UV applied per step
    "mha": {"VLLM_MLA_DISABLE": "1"},  # every head's key and value cached: split by heads
}


def _checkpoint(family: str, random_checkpoint: Callable[..., Path]) -> Path:
    name = FAMILIES[family][0]
    if family == "deepseek_v2":
        return mla_parity._checkpoint(name, random_checkpoint)
    if family == "deepseek_v3":
        return v3_parity._checkpoint(name, random_checkpoint)
    return families._checkpoint(name, random_checkpoint)


def rank_jobs(random_checkpoint: Callable[..., Path], tmp: Path) -> list[dict[str, Any]]:
    """This file's jobs (run with test_ranks.py's by conftest.rank_runs)."""
    jobs: list[dict[str, Any]] = []
    for family, (_, prompts, _) in FAMILIES.items():
        model = _checkpoint(family, random_checkpoint)
        shapes: list[tuple[str, int, int, dict[str, str]]] = [
            (f"tp{tp}-pp{pp}", tp, pp, {}) for tp, pp in ((1, 1), (2, 1), (1, 2))
        ]
        if family == "deepseek_v3":
            shapes.append(("tp2-pp2", 2, 2, {}))  # both at once: 4 ranks
        if family == "deepseek_v2":
            shapes += [(f"tp2-{mode}", 2, 1, env) for mode, env in MLA_MODES.items()]
        for shape, tp, pp, env in shapes:
            jobs.append(job(f"{family}-{shape}", model, tp, pp, prompts, MAX_TOKENS, tmp, env=env))
    return jobs


@pytest.fixture(scope="module")
def runs(rank_runs: dict[str, Any]) -> dict[str, Any]:
    return rank_runs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_stages_compute_what_one_rank_does(runs: dict[str, Any], family: str) -> None:
    """Layers 0-1 on stage 0, layer 2 on stage 1: DeepSeek's and Qwen2-MoE's dense layer
    and Gemma's first local, global and second local layers fall on either side."""
    got, want = ok(runs, f"{family}-tp1-pp2"), ok(runs, f"{family}-tp1-pp1")
    assert len(got["logits"]) == MAX_TOKENS
    assert_pipeline_identical(got, want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_parallel_logits_agree_with_one_rank(runs: dict[str, Any], family: str) -> None:
    largest, near_ties = compare_tensor_parallel(
        ok(runs, f"{family}-tp2-pp1"), ok(runs, f"{family}-tp1-pp1"), TP_TOLERANCE
    )
    # the measured agreement (pytest -s shows it)
    print(
        f"{family} tp=2 vs tp=1: max |logit diff| {largest:.2e}, near-ties: {near_ties or 'none'}"
    )


@pytest.mark.parametrize("mode", list(MLA_MODES))
def test_latent_attention_modes_split_too(runs: dict[str, Any], mode: str) -> None:
    """Per-step absorption and every head cached (each rank its heads' keys and values)
    agree with one rank's default mode within the tolerance as well."""
    got, want = ok(runs, f"deepseek_v2-tp2-{mode}"), ok(runs, "deepseek_v2-tp1-pp1")
    largest, near_ties = compare_tensor_parallel(got, want, TP_TOLERANCE)
    print(
        f"deepseek_v2 tp=2 ({mode}) vs tp=1: max |logit diff| {largest:.2e}, near-ties: {near_ties or 'none'}"
    )


def test_tensor_and_pipeline_parallel_together(runs: dict[str, Any]) -> None:
    compare_tensor_parallel(
        ok(runs, "deepseek_v3-tp2-pp2"), ok(runs, "deepseek_v3-tp1-pp1"), TP_TOLERANCE
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_models_match_transformers(
    runs: dict[str, Any], random_checkpoint: Callable[..., Path], family: str
) -> None:
    """TP=2's and PP=2's greedy tokens are transformers' (the cached reference of the
    parity test), and the chosen tokens' logprobs within 1e-4 of its; DeepSeek-V2's
    also in its other attention modes."""
    _, prompts, length = FAMILIES[family]
    reference = hf_greedy(_checkpoint(family, random_checkpoint), prompts, length)
    shapes = ["tp2-pp1", "tp1-pp2"]
    if family == "deepseek_v2":
        shapes += [f"tp2-{mode}" for mode in MLA_MODES]
    for shape in shapes:
        run = ok(runs, f"{family}-{shape}")
        for r, want in enumerate(reference.tokens):
            assert run["tokens"][r] == want[:MAX_TOKENS], (shape, r)
            for step, token in enumerate(run["tokens"][r]):
                logprob = torch.log_softmax(run["logits"][step][r], dim=-1)[token].item()
                want_logprob = reference.chosen_logprobs[r][step]
                assert logprob == pytest.approx(want_logprob, abs=1e-4), (shape, r, step)


# refusals (in-process: the shard arithmetic) ---------------------------------------------


def _config(**fields: Any) -> ModelConfig:
    base = ModelConfig(
        architecture="Qwen2MoeForCausalLM",
        vocab_size=101,
        hidden_size=8,
        intermediate_size=12,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=False,
        sliding_window=None,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=6,
        shared_expert_intermediate_size=10,
        moe_layers=(True, False),
    )
    return replace(base, **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"moe_intermediate_size": 9}, "moe_intermediate_size \\(each expert's\\)=9 is not divisible by tensor_parallel_size=2"),
        ({"shared_expert_intermediate_size": 7}, "shared expert's intermediate size=7 is not divisible by tensor_parallel_size=2"),
        ({"intermediate_size": 5}, "intermediate_size=5 is not divisible by tensor_parallel_size=2"),
        ({"num_heads": 6, "num_kv_heads": 6}, "6 attention heads are not divisible by tensor_parallel_size=4"),
    ],
)  # fmt: skip
def test_splits_that_do_not_divide_are_refused_naming_the_numbers(
    fields: dict[str, Any], message: str
) -> None:
    tp = 4 if "num_heads" in fields else 2
    with pytest.raises(ConfigError, match=message):
        ShardLayout.build(_config(**fields), ParallelConfig(tp, 1), 0)


def test_mixtral_s_intermediate_size_is_its_experts_and_need_not_split_twice() -> None:
    """Every layer a mixture: the dense intermediate_size is not checked on its own."""
    model = _config(moe_layers=(True, True), intermediate_size=5, shared_expert_intermediate_size=0)
    layout = ShardLayout.build(model, ParallelConfig(2, 1), 1)
    assert layout.moe_intermediate == (3, 6)
    assert layout.rank_config(model).moe_intermediate_size == 3


def test_each_expert_and_the_shared_expert_are_split_by_their_intermediate_rows() -> None:
    model = _config()
    g = torch.Generator().manual_seed(0)
    h, i, s = model.hidden_size, model.moe_intermediate_size, model.shared_expert_intermediate_size
    state = {
        "model.layers.0.mlp.gate.weight": torch.randn(4, h, generator=g),
        "model.layers.0.mlp.shared_expert_gate.weight": torch.randn(1, h, generator=g),
        "model.layers.0.mlp.experts.3.gate_proj.weight": torch.randn(i, h, generator=g),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(h, i, generator=g),
        "model.layers.0.mlp.shared_expert.up_proj.weight": torch.randn(s, h, generator=g),
        "model.layers.0.mlp.shared_expert.down_proj.weight": torch.randn(h, s, generator=g),
        "model.layers.1.block_sparse_moe.experts.0.w3.weight": torch.randn(i, h, generator=g),
        "model.layers.1.block_sparse_moe.experts.0.w2.weight": torch.randn(h, i, generator=g),
    }
    halves = [
        dict(shard_weights(state.items(), ShardLayout.build(model, ParallelConfig(2, 1), r), model))
        for r in range(2)
    ]
    for name, whole in state.items():
        a, b = halves[0][name], halves[1][name]
        if name.endswith(("gate.weight", "shared_expert_gate.weight")):  # replicated
            assert torch.equal(a, whole) and torch.equal(b, whole)
        elif "down_proj" in name or name.endswith("w2.weight"):  # input columns
            assert (
                torch.equal(torch.cat([a, b], dim=1), whole) and a.shape[1] == whole.shape[1] // 2
            )
        else:  # output rows
            assert torch.equal(torch.cat([a, b]), whole) and a.shape[0] == whole.shape[0] // 2


def test_latent_attention_is_split_by_heads_and_its_latent_path_replicated() -> None:
    heads, nope, rope, v, lat, h = 4, 3, 2, 5, 6, 8
    model = _config(
        architecture="DeepseekV3ForCausalLM",
        num_heads=heads,
        num_kv_heads=1,
        head_dim=lat + rope,
        kv_lora_rank=lat,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        q_lora_rank=7,
    )
    g = torch.Generator().manual_seed(1)
    a = "model.layers.0.self_attn."
    state = {
        a + "q_a_proj.weight": torch.randn(7, h, generator=g),
        a + "q_b_proj.weight": torch.randn(heads * (nope + rope), 7, generator=g),
        a + "kv_a_proj_with_mqa.weight": torch.randn(lat + rope, h, generator=g),
        a + "kv_a_layernorm.weight": torch.randn(lat, generator=g),
        a + "kv_b_proj.weight": torch.randn(heads * (nope + v), lat, generator=g),
        a + "o_proj.weight": torch.randn(h, heads * v, generator=g),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.randn(4, generator=g),
    }
    halves = [
        dict(shard_weights(state.items(), ShardLayout.build(model, ParallelConfig(2, 1), r), model))
        for r in range(2)
    ]
    assert halves[1][a + "q_b_proj.weight"].shape == (2 * (nope + rope), 7)
    assert torch.equal(
        halves[1][a + "kv_b_proj.weight"], state[a + "kv_b_proj.weight"][2 * (nope + v) :]
    )
    assert torch.equal(halves[1][a + "o_proj.weight"], state[a + "o_proj.weight"][:, 2 * v :])
    for name in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight"):
        assert torch.equal(halves[1][a + name], state[a + name])  # every rank's whole latent
    bias = "model.layers.0.mlp.gate.e_score_correction_bias"
    assert torch.equal(halves[0][bias], state[bias])


def test_a_rank_reads_only_its_share_of_each_tensor(random_checkpoint: Callable[..., Path]) -> None:
    """With ``narrow`` the safetensors reader cuts each tensor as it reads it (get_slice):
    the same parts, of the same shapes, as cutting the whole tensors afterwards."""
    from kvrun import envs
    from kvrun.config import EngineArgs
    from kvrun.distributed.parallel import weight_plan
    from kvrun.engine.builder import load_model_source

    path = _checkpoint("qwen2_moe", random_checkpoint)
    checkpoint, model, _ = load_model_source(EngineArgs(model=str(path)), envs.read_env({}))
    layout = ShardLayout.build(model, ParallelConfig(2, 2), rank=3)  # stage 1, tp_rank 1
    wants = lambda name: layout.wants(name, model.tie_word_embeddings)  # noqa: E731
    whole = dict(
        shard_weights(
            checkpoint.iter_weights(torch.float32, progress=False, select=wants), layout, model
        )
    )
    read = dict(
        shard_weights(
            checkpoint.iter_weights(
                torch.float32,
                progress=False,
                select=wants,
                narrow=lambda name, shape: weight_plan(name, shape, layout, model),
            ),
            layout,
            model,
            narrowed=True,
        )
    )
    assert whole.keys() == read.keys() and len(read) > 20
    for name, tensor in read.items():
        assert torch.equal(tensor, whole[name]), name
    expert = "model.layers.0.mlp.experts.5.down_proj.weight"  # global layer 2
    assert read[expert].shape == (model.hidden_size, model.moe_intermediate_size // 2)
    assert read["lm_head.weight"].shape == (layout.vocab_shard, model.hidden_size)
