"""Single-stream decode of SmolLM2-shaped models of each family, fused decode step on
and off: what the cpu plugin's fused decoder is worth per family.

    python benchmarks/fused_families.py [--tokens 128] [--repeats 3] [--dtype float32]

Each family gets SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3 kv heads of
64, intermediate 1536) with random weights (``load_format="dummy"``: config.json and
the SmolLM2 tokenizer only). A request of 16 prompt tokens decodes ``--tokens`` tokens
(ignore_eos); the figure is the decode rate, median of ``--repeats``. "op by op" takes
the fused decode step away from the same engine (``runner.fused_decoder = None``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.envs import read_env
from kvrun.sampling_params import SamplingParams
from kvrun.testing.checkpoints import TOKENIZER_FILES, build_hf_checkpoint_from_gguf

SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
}


def make_model(root: Path, family: str, tokenizer_dir: Path) -> Path:
    out = root / family
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**SHAPE, **FAMILIES[family]}))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def decode_rate(engine: LLMEngine, tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.add_request(engine.new_request_id(), list(range(100, 116)), params)
    accumulator = OutputAccumulator()
    first = None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            accumulator.add(delta)
        if first is None:
            first = time.perf_counter()  # after the prefill step
    assert first is not None
    return (tokens - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    env = read_env({**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "0.25"})
    rows: list[tuple[str, str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf_dir = build_hf_checkpoint_from_gguf(None, root / "smollm2")
        for family in FAMILIES:
            model = make_model(root, family, hf_dir)
            engine = LLMEngine.from_args(
                EngineArgs(model=str(model), load_format="dummy", dtype=args.dtype),
                env,
            )
            runner: Any = engine.runner
            fused = runner.fused_decoder
            decode_rate(engine, 8)  # warm-up
            for label, decoder in (("fused", fused), ("op by op", None)):
                runner.fused_decoder = decoder
                rates = [decode_rate(engine, args.tokens) for _ in range(args.repeats)]
                rows.append(
                    (
                        family,
                        label if fused is not None else "op by op (not taken)",
                        statistics.median(rates),
                    )
                )
    print(f"| family | decode step | tok/s ({args.dtype}, median of {args.repeats}) |")
    print("|---|---|---:|")
    for family, label, rate in rows:
        print(f"| {family} | {label} | {rate:.1f} |")


if __name__ == "__main__":
    main()
