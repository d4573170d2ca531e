"""The HPU decode path end to end on the CPU: scheduler, lowest-id-first blocks, contiguous PA.

A tiny random Llama runs through the core's Scheduler (with the policy the HPU platform
picks) and ModelRunner (with HpuFlatAttention); its greedy tokens must equal the core
reference's, which recomputes every sequence from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.engine.model_runner import ModelRunner
from kvrun.loader import load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun.models.registry import ModelRegistry
from kvrun.ops import reference_ops
from kvrun.scheduling import LowestIdFirst, Request, Scheduler, SchedulerConfig
from kvrun.testing.parity import MAX_NEW_TOKENS, build_tiny_llama, kit_prompts, reference_greedy
from kvrun_hpu.attention import HpuFlatAttention
from kvrun_hpu.buckets import BucketRange

CPU = torch.device("cpu")
BS = 16
NUM_BLOCKS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hpu-tiny-llama"))


@pytest.fixture(scope="module")
def reference_tokens(model_dir: Path) -> list[list[int]]:
    return reference_greedy(model_dir, kit_prompts(), torch.float32, CPU)[0]


@dataclass(frozen=True)
class Run:
    tokens: list[list[int]]  # [request][MAX_NEW_TOKENS] greedy tokens
    decode_steps: int  # steps with no prefill chunk: the flat attention path
    peak_blocks: int  # most blocks in use at once
    max_block_id: int  # highest block id any step used


def run_hpu_path(model_dir: Path, prompts: list[list[int]], contiguous: bool) -> Run:
    checkpoint = load_checkpoint(
        str(model_dir), revision=None, hf_hub_offline=True, use_modelscope=False, download_dir=None
    )
    config = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    spec = AttentionLayerSpec(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        scale=config.head_dim**-0.5,
    )
    attention = HpuFlatAttention(
        spec,
        contiguous=contiguous,
        batch_buckets=BucketRange(1, 2, 4),
        block_buckets=BucketRange(4, 8, 16),
    )
    model_cls = ModelRegistry().resolve(config.architecture, checkpoint.source)
    model = model_cls(config, reference_ops(), attention, torch.float32, CPU)
    model.load_weights(checkpoint.iter_weights(torch.float32), checkpoint.source)
    shape = attention.kv_cache_shape(NUM_BLOCKS, BS, config.num_kv_heads, config.head_dim)
    caches = [torch.zeros(shape) for _ in range(config.num_layers)]
    runner = ModelRunner(model, caches, BS, CPU)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=BS,
            max_model_len=256,
            block_size=BS,
            num_blocks=NUM_BLOCKS,
            enable_prefix_caching=False,  # what check_config does under contiguous PA
        ),
        free_block_policy=LowestIdFirst() if contiguous else None,
    )
    requests = [
        Request(f"r{i}", prompt, MAX_NEW_TOKENS, ignore_eos=True)
        for i, prompt in enumerate(prompts)
    ]
    for request in requests:
        scheduler.add_request(request)
    decode_steps = peak = max_id = 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        decode_steps += all(not c.is_prefill for c in out.chunks)
        peak = max(peak, scheduler.block_manager.num_used_blocks)
        max_id = max([max_id, *(b for c in out.chunks for b in c.block_ids)])
        step = runner.execute(out.chunks)
        chosen = step.logits.argmax(-1).tolist()
        scheduler.update(out, {r: [t] for r, t in zip(step.request_ids, chosen, strict=True)})
    return Run([r.output_token_ids for r in requests], decode_steps, peak, max_id)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "flat"])
def test_greedy_tokens_equal_the_reference(
    model_dir: Path, reference_tokens: list[list[int]], contiguous: bool
) -> None:
    run = run_hpu_path(model_dir, kit_prompts(), contiguous)
    assert run.tokens == reference_tokens
    assert run.decode_steps >= MAX_NEW_TOKENS - 1
    # Lowest id first keeps the contiguous range no longer than the peak block count.
    assert run.max_block_id < run.peak_blocks or not contiguous
