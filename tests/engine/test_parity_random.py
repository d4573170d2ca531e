"""Greedy parity with transformers on small random-weight Llama, Qwen2 and Mistral models.

Random weights with a wide init make the next-token distribution peaked enough that
argmax is decided by real differences, not by float noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrun.sampling_params import SamplingParams
from tests.support.engine import hf_greedy, make_engine, run_all

NEW_TOKENS = 24
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"num_heads": 4, "num_kv_heads": 2}),
    "llama3-rope-scaling-tied": (
        "llama",
        {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True, "num_kv_heads": 1},
    ),
    "qwen2-bias-sharded": ("qwen2", {"max_shard_size": "2MB", "num_kv_heads": 2}),
    "mistral": ("mistral", {"num_heads": 8, "num_kv_heads": 2, "head_dim": 16}),
}
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9],
    list(range(100, 160)),
    [5, 6, 7],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_random_model_matches_transformers(
    name: str, random_checkpoint: Callable[..., Path]
) -> None:
    arch, kwargs = MODELS[name]
    model_dir = random_checkpoint(arch, seed=7, init_std=0.3, num_layers=3, **kwargs)
    expected = hf_greedy(model_dir, PROMPTS, NEW_TOKENS).tokens
    batched = run_all(make_engine(model_dir, max_model_len=128), PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in batched] == expected
    # Under a KV budget that holds about two sequences at once.
    tight = make_engine(
        model_dir, max_model_len=128, num_kv_blocks=10, max_num_batched_tokens=32, max_num_seqs=4
    )
    pressured = run_all(tight, PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in pressured] == expected
    assert tight.stats().scheduler.num_preemptions_total > 0
