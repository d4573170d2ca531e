"""What the cpu fused-decoder tests share (plugins/cpu/tests/test_cpu_fused_decoder.py,
test_cpu_fused_decoder_lora.py): their random checkpoints, built once per machine and
cached under $KVRUN_TEST_CACHE; their engines; the decode batch they run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrun.config import EngineArgs
from kvrun.engine.batch import BatchInputs, build_batch
from kvrun.engine.llm_engine import LLMEngine
from kvrun.envs import read_env
from kvrun.sampling_params import SamplingParams
from kvrun.scheduling.output import ScheduledChunk
from kvrun.testing.checkpoints import Arch, build_random_checkpoint
from tests.support.checkpoints import cached_build

__all__ = ["MODELS", "decode_batch", "decode_chunks", "fused_decoder_checkpoints", "make_engine"]

# (arch, sizes): head_dim 16 on the kernels' generic length; 64 on their unrolled one,
# with Qwen2's q/k/v bias; 32 with Qwen3's per-head q/k norms (layout version 2).
MODELS: dict[str, tuple[Arch, dict[str, int]]] = {
    "llama-d16": ("llama", {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}),
    "qwen2-d64": ("qwen2", {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1}),
    "qwen3-d32": ("qwen3", {"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32}),
}


@functools.cache
def fused_decoder_checkpoints() -> dict[str, Path]:
    """MODELS' random checkpoints (intermediate size 128), name -> directory."""
    return {
        name: cached_build(
            f"fused-decoder-{name}",
            {"arch": arch, "intermediate_size": 128, **sizes},
            functools.partial(build_random_checkpoint, arch, intermediate_size=128, **sizes),
        )
        for name, (arch, sizes) in MODELS.items()
    }


def make_engine(model: Path, cache_root: str, **kwargs: Any) -> LLMEngine:
    """An engine on the cpu platform (native kernels built in ``cache_root``): 64 KV
    blocks, max_model_len 256, no prefix caching, float32 unless ``dtype`` says;
    ``kwargs`` are further EngineArgs."""
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CACHE_ROOT": cache_root}
    kwargs.setdefault("dtype", "float32")
    return LLMEngine.from_args(
        EngineArgs(
            model=str(model),
            num_kv_blocks=64,
            max_model_len=256,
            enable_prefix_caching=False,
            **kwargs,
        ),
        read_env(env),
    )


def decode_chunks(engine: LLMEngine, prompt_lens: Sequence[int]) -> list[ScheduledChunk]:
    """Prefill one request per length, then schedule their first decode step: its chunks
    (one token each)."""
    for i, n in enumerate(prompt_lens):
        ids = [(7 * i + 3 * t) % 1000 + 10 for t in range(n)]
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.scheduler.stats.num_waiting:
        engine.step()
    out = engine.scheduler.schedule()
    assert all(len(c.token_ids) == 1 for c in out.chunks)
    return list(out.chunks)


def decode_batch(engine: LLMEngine, prompt_lens: Sequence[int]) -> BatchInputs:
    """Prefill one request per length, then the batch of their first decode step."""
    chunks = decode_chunks(engine, prompt_lens)
    return build_batch(chunks, engine.config.block_size, engine.platform.device)
