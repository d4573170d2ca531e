"""kvrun-cuda memory profiling: the dummy largest step, run on CPU with a tiny real model."""

from __future__ import annotations

import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.models.config import ModelConfig
from kvrun.models.llama import LlamaForCausalLM
from kvrun.ops import reference_ops
from kvrun.scheduling.output import ScheduledChunk
from kvrun_cuda.profiling import dummy_chunks, make_profile_run


def test_dummy_chunks_fill_the_token_budget() -> None:
    chunks = dummy_chunks(max_num_batched_tokens=10, max_num_seqs=3, block_size=2)
    assert chunks == [
        ScheduledChunk("profile-0", [0] * 4, 0, [0, 1], True, True),
        ScheduledChunk("profile-1", [0] * 3, 0, [2, 3], True, True),
        ScheduledChunk("profile-2", [0] * 3, 0, [4, 5], True, True),
    ]
    assert [c.num_tokens for c in dummy_chunks(3, 8, 16)] == [1, 1, 1]


def test_the_profile_run_drives_a_real_model() -> None:
    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attention_bias=False,
        sliding_window=None,
    )
    attention = ReferenceAttention(AttentionLayerSpec(4, 2, 8, 8**-0.5))
    cpu = torch.device("cpu")
    model = LlamaForCausalLM(config, reference_ops(), attention, torch.float32, cpu)
    run = make_profile_run(
        model,
        num_layers=2,
        layer_shape=lambda n: attention.kv_cache_shape(n, 4, 2, 8),
        cache_dtype=torch.float32,
        max_num_batched_tokens=24,
        max_num_seqs=5,
        block_size=4,
        device=cpu,
    )
    assert run() is None
