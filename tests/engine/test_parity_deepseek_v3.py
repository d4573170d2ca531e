"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on small random-weight
checkpoints: V2's latent attention with V3's routing (sigmoid scores, the
e_score_correction_bias choosing experts but not weighting them, groups ranked by their
two best scores, renormalized and scaled weights), in each of kvrun's attention modes.
Greedy tokens equal and logprobs within float tolerance, batched and one at a time; the
prompts' tokens reach most experts and the bias changes some choices (so a router that
ignored it would fail); multi-token-prediction weights are skipped with a log line.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.errors import ModelLoadError
from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_mla import MODES, PROMPTS
from tests.support.engine import hf_greedy, make_engine, run_all

NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
V3 = {
    "kv_lora_rank": 32,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
}
MODELS: dict[str, dict[str, Any]] = {
    "v3-shaped": V3,
    # q straight from the hidden state, rotary in halves, weights not renormalized
    "v3-halves-unnormalized": {
        **V3,
        "q_lora_rank": None,
        "rope_interleave": False,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    },
}


def _checkpoint(name: str, random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint(
        "deepseek_v3",
        seed=7,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=MODELS[name],
    )


def _assert_matches(engine: Any, reference: Any) -> None:
    for one_at_a_time in (False, True):
        outputs = run_all(engine, PROMPTS, GREEDY, one_at_a_time=one_at_a_time)
        assert [o.outputs[0].token_ids for o in outputs] == reference.tokens
        for i, out in enumerate(outputs):
            seq = out.outputs[0]
            assert seq.logprobs is not None
            for step, token in enumerate(seq.token_ids):
                assert seq.logprobs[step][token].logprob == pytest.approx(
                    reference.chosen_logprobs[i][step], abs=1e-4
                ), (i, step)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_deepseek_v3_matches_transformers(
    name: str, mode: str, random_checkpoint: Callable[..., Path]
) -> None:
    model_dir = _checkpoint(name, random_checkpoint)
    reference = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    _assert_matches(make_engine(model_dir, env=MODES[mode], max_model_len=128), reference)


@torch.inference_mode()
def test_the_prompts_reach_most_experts_and_the_bias_changes_choices(
    random_checkpoint: Callable[..., Path],
) -> None:
    """In transformers' own router on the test prompts: the tokens are spread over the
    experts, and choosing without the correction bias would pick other experts for some
    tokens (so the parity tests above check that kvrun uses the bias for the choice)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(_checkpoint("v3-shaped", random_checkpoint)), dtype=torch.float32
    )
    chosen: list[torch.Tensor] = []
    unbiased: list[torch.Tensor] = []

    def record(module: Any, args: Any, output: Any) -> None:
        chosen.append(output[2])
        saved = module.e_score_correction_bias.clone()
        module.e_score_correction_bias.zero_()
        unbiased.append(type(module).forward(module, args[0])[2])
        module.e_score_correction_bias.copy_(saved)

    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    hooks = [g.register_forward_hook(record) for g in gates]
    for prompt in PROMPTS:
        model(torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    experts = torch.cat([c.flatten() for c in chosen])
    assert len(set(experts.tolist())) >= 6
    changed = sum(
        int((a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).sum())
        for a, b in zip(chosen, unbiased)
    )
    assert changed > 0


def test_multi_token_prediction_weights_are_skipped_with_a_log_line(
    random_checkpoint: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint with DeepSeek-V3's MTP layer (model.layers.{num_hidden_layers}.*)
    loads to the same outputs, its weights skipped and logged."""
    from safetensors.torch import load_file, save_file

    source = _checkpoint("v3-shaped", random_checkpoint)
    model_dir = tmp_path / "with-mtp"
    shutil.copytree(source, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    state["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    state["model.layers.3.enorm.weight"] = torch.ones(64)
    state["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] = torch.randn(40, 64)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    reference = hf_greedy(source, PROMPTS, NEW_TOKENS)
    with caplog.at_level(logging.INFO, logger="kvrun.models.deepseek"):
        engine = make_engine(model_dir, max_model_len=128)
    assert "skipped 3 weights of multi-token-prediction layer(s) 3" in caplog.text
    outputs = run_all(engine, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == reference.tokens


def test_a_v3_config_naming_other_routing_is_refused(
    random_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """transformers' V3 router always runs sigmoid + noaux_tc: a config saying otherwise
    is refused by name rather than run as something it does not say."""
    import json

    model_dir = tmp_path / "softmax-v3"
    shutil.copytree(_checkpoint("v3-shaped", random_checkpoint), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["scoring_func"] = "softmax"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="deepseek_v3 routing scoring_func='softmax'"):
        make_engine(model_dir, max_model_len=128)


def test_dummy_weights_load_into_deepseek_v3(random_checkpoint: Callable[..., Path]) -> None:
    """load_format="dummy": config.json alone, transformers' stored names (the router's
    correction bias included)."""
    engine = make_engine(
        _checkpoint("v3-shaped", random_checkpoint), load_format="dummy", max_model_len=128
    )
    [out] = run_all(engine, PROMPTS[:1], GREEDY)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
