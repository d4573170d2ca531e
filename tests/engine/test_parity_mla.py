"""DeepSeek-V2 (multi-head latent attention, routed and shared experts) against
transformers on small random-weight checkpoints, in each of kvrun's attention modes:
the latent cached with W_UK/W_UV absorbed at load (the default), the latent cached with
them applied per step (VLLM_MLA_PERFORM_MATRIX_ABSORPTION=0), and every head cached
(VLLM_MLA_DISABLE=1). Greedy tokens equal and logprobs within float tolerance, batched,
one at a time and under a tight KV budget.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrun.sampling_params import SamplingParams
from tests.support.engine import hf_greedy, make_engine, run_all

NEW_TOKENS = 20
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9],
    list(range(100, 150)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
# V2-Lite's shape, scaled down: q straight from the hidden state, one dense layer first.
MLA = {
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "moe_intermediate_size": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}
MODELS: dict[str, dict[str, Any]] = {
    "v2-lite-shaped": {**MLA, "q_lora_rank": None},
    # V2's shape: q through its own latent; both experts from the best of 4 groups, scaled
    "v2-shaped-grouped": {
        **MLA,
        "q_lora_rank": 24,
        "n_routed_experts": 8,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 1,
        "routed_scaling_factor": 2.0,
    },
}
MODES = {
    "absorbed-at-load": {},
    "absorbed-per-step": {"VLLM_MLA_PERFORM_MATRIX_ABSORPTION": "0"},
    "mla-disabled": {"VLLM_MLA_DISABLE": "1"},
}


def _checkpoint(name: str, random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint(
        "deepseek_v2",
        seed=5,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=MODELS[name],
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_deepseek_v2_matches_transformers(
    name: str, mode: str, random_checkpoint: Callable[..., Path]
) -> None:
    model_dir = _checkpoint(name, random_checkpoint)
    reference = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    engine = make_engine(model_dir, env=MODES[mode], max_model_len=128)
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
    tight = make_engine(
        model_dir,
        env=MODES[mode],
        max_model_len=128,
        num_kv_blocks=8,
        max_num_batched_tokens=16,
        max_num_seqs=3,
    )
    assert [o.outputs[0].token_ids for o in run_all(tight, PROMPTS, GREEDY)] == reference.tokens
    assert tight.stats().scheduler.num_preemptions_total > 0


def test_the_latent_cache_holds_one_head_of_latent_and_rope(
    random_checkpoint: Callable[..., Path],
) -> None:
    """Per token and layer the absorbed cache holds kv_lora_rank + rope values in one
    plane, where the cache of every head holds heads x (nope + rope) in two."""
    model_dir = _checkpoint("v2-lite-shaped", random_checkpoint)
    latent = make_engine(model_dir, max_model_len=128, num_kv_blocks=16)
    heads = make_engine(model_dir, env=MODES["mla-disabled"], max_model_len=128, num_kv_blocks=16)

    def per_token(engine: Any) -> int:
        cache = engine.runner.kv_caches[0]
        return cache.numel() // (16 * engine.config.block_size)

    assert per_token(latent) == MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]
    assert per_token(heads) == 2 * 4 * (MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"])


def test_dummy_weights_load_into_the_latent_attention_model(
    random_checkpoint: Callable[..., Path],
) -> None:
    """load_format="dummy" for DeepSeek-V2: config.json alone, the stored tensor names."""
    engine = make_engine(
        _checkpoint("v2-lite-shaped", random_checkpoint), load_format="dummy", max_model_len=128
    )
    [out] = run_all(engine, PROMPTS[:1], GREEDY)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
