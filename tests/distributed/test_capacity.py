"""The capacity arithmetic of docs/distributed.md, checked against published sizes and
against itself: every rank's share adds up to the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from kvrun.distributed.capacity import (
    ModelShape,
    allreduce_bytes_per_token,
    kv_bytes_per_token,
    kv_heads_per_rank,
    parameter_count,
    pipeline_bytes_per_token,
    stage_parameter_count,
)
from kvrun.errors import ConfigError

# Llama-3-70B's config.json (published): 70.55 B parameters.
LLAMA3_70B = ModelShape(
    num_layers=80,
    hidden_size=8192,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=28672,
    vocab_size=128256,
)
# SmolLM2-135M (the default model): tied embeddings, 134.5 M parameters.
SMOLLM2 = ModelShape(
    num_layers=30,
    hidden_size=576,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tied_embeddings=True,
)


def test_parameter_counts_match_the_published_sizes() -> None:
    assert parameter_count(LLAMA3_70B) == 70_553_706_496
    assert parameter_count(SMOLLM2) == 134_515_008


def test_the_shape_of_a_real_checkpoint_counts_its_tensors(smollm2_hf_dir: Path) -> None:
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    shape = ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tied_embeddings=config["tie_word_embeddings"],
    )
    assert shape == SMOLLM2
    stored = 0
    for path in smollm2_hf_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name != "lm_head.weight":  # a tied head may be stored as a copy
                    stored += _numel(f, name)
    assert stored == parameter_count(SMOLLM2)


def _numel(f: object, name: str) -> int:
    count = 1
    for dim in f.get_slice(name).get_shape():  # type: ignore[attr-defined]
        count *= dim
    return count


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (1, 4), (8, 1), (8, 2), (4, 4)])
def test_the_ranks_shares_add_up_to_the_model(tp: int, pp: int) -> None:
    shape = LLAMA3_70B
    held = sum(tp * stage_parameter_count(shape, tp, pp, stage) for stage in range(pp))
    # norms are replicated on every tensor-parallel rank; nothing else is
    replicated_norms = (tp - 1) * (2 * shape.hidden_size * shape.num_layers + shape.hidden_size)
    assert held == parameter_count(shape) + replicated_norms


def test_a_tied_head_is_a_second_copy_only_across_stages() -> None:
    one_stage = stage_parameter_count(SMOLLM2, 1, 1, 0)
    assert one_stage == parameter_count(SMOLLM2)
    two_stages = sum(stage_parameter_count(SMOLLM2, 1, 2, s) for s in range(2))
    assert two_stages == parameter_count(SMOLLM2) + SMOLLM2.vocab_size * SMOLLM2.hidden_size


def test_kv_heads_split_or_replicate() -> None:
    assert kv_heads_per_rank(LLAMA3_70B, 4) == 2
    assert kv_heads_per_rank(LLAMA3_70B, 8) == 1
    assert kv_heads_per_rank(LLAMA3_70B, 16) == 1  # replicated: fewer heads than ranks
    # 70B, TP=8 x PP=2 in bf16: 20 KiB per token on each of the 16 GPUs
    assert kv_bytes_per_token(LLAMA3_70B, 8, num_layers=40) == 20480
    # the whole model on one device: 320 KiB per token
    assert kv_bytes_per_token(LLAMA3_70B, 1) == 327_680


def test_collective_traffic_per_token() -> None:
    assert allreduce_bytes_per_token(LLAMA3_70B, 1) == 0
    # 40 layers x 2 all-reduces x 16 KiB x 2 * 7/8
    assert allreduce_bytes_per_token(LLAMA3_70B, 8, num_layers=40) == 2_293_760
    assert pipeline_bytes_per_token(LLAMA3_70B) == 32768


def test_a_bad_partition_is_refused_by_the_same_rule_as_the_engine() -> None:
    with pytest.raises(ConfigError, match="sums to 79"):
        stage_parameter_count(LLAMA3_70B, 8, 2, 0, partition=[40, 39])
