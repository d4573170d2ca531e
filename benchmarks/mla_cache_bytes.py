"""KV cache bytes per token: multi-head latent attention against plain attention,
as kvrun allocates them (issue 13's benchmark, second half).

    .venv/bin/python benchmarks/mla_cache_bytes.py [--json]

Builds kvrun engines (bf16, dummy weights, 16 KV blocks) on config-only checkpoints of
DeepSeek-V2-Lite's attention shape (hidden 2048, 16 heads of 128 + 64 rope, v 128,
kv_lora_rank 512, q straight from the hidden state, rope yarn as in its config) and
reads back the cache tensors the platform allocated: bytes per token and layer =
layer tensor bytes / (blocks x block size), every layer checked equal, times V2-Lite's
27 layers. What it measures:

- ``mla``: kvrun's default (the latent [c | k_pe] cached, W_UK/W_UV absorbed);
- ``mla-disabled``: VLLM_MLA_DISABLE=1, every head's key and value cached;
- ``mha``: the same-size model with plain multi-head attention (a Llama: 16 heads of
  128, 16 KV heads, hidden 2048).

Only what does not reach the cache is shrunk so that the engines build in seconds:
one decoder layer (a dense one), intermediate 1024, SmolLM2's 49,152-token vocabulary.
The figures are whatever kvrun allocates when it runs (a single-plane latent cache
halves ``mla``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["measure_all"]

BENCH = Path(__file__).resolve().parent
TOKENIZER = BENCH / "models" / "smollm2-135m-f32"
FULL_LAYERS = 27  # DeepSeek-V2-Lite's num_hidden_layers

COMMON = {
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# DeepSeek-V2-Lite's attention (config.json of deepseek-ai/DeepSeek-V2-Lite), with
# first_k_dense_replace = 1 so that the one layer kept is its dense one.
DEEPSEEK_V2_LITE = {
    **COMMON,
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "routed_scaling_factor": 1.0,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
    },
}
PLAIN_MHA = {
    **COMMON,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "head_dim": 128,
    "rope_theta": 10000.0,
}
CASES: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "mla": (DEEPSEEK_V2_LITE, {}),
    "mla-disabled": (DEEPSEEK_V2_LITE, {"VLLM_MLA_DISABLE": "1"}),
    "mha": (PLAIN_MHA, {}),
}


def _config_dir(config: dict[str, Any], root: Path, name: str) -> Path:
    out = root / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (TOKENIZER / f).is_file():
            shutil.copyfile(TOKENIZER / f, out / f)
    return out


def _measure(model_dir: Path, env: dict[str, str], blocks: int) -> dict[str, Any]:
    """Build the engine and read what its platform allocated for the KV cache."""
    import kvrun

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        llm = kvrun.LLM(
            model=str(model_dir),
            dtype="bfloat16",
            load_format="dummy",
            max_model_len=256,
            num_kv_blocks=blocks,
            enable_prefix_caching=False,
        )
        engine = llm.llm_engine
        caches = engine.runner.kv_caches  # type: ignore[attr-defined]  # the in-process runner
        tokens = blocks * engine.config.block_size
        per_layer = sorted({c.numel() * c.element_size() // tokens for c in caches})
        if len(per_layer) != 1:
            raise RuntimeError(f"layers differ in bytes per token: {per_layer}")
        return {
            "cache_dtype": str(caches[0].dtype).removeprefix("torch."),
            "layer_shape": list(caches[0].shape),
            "block_size": engine.config.block_size,
            "bytes_per_token_layer": per_layer[0],
            "bytes_per_token_27_layers": per_layer[0] * FULL_LAYERS,
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_all(blocks: int = 16) -> dict[str, Any]:
    """Every case's allocation; ratios against plain multi-head attention."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = {
            name: _measure(_config_dir(config, root, name), env, blocks)
            for name, (config, env) in CASES.items()
        }
    mha = out["mha"]["bytes_per_token_layer"]
    for entry in out.values():
        entry["x_mha"] = entry["bytes_per_token_layer"] / mha
    return out


def markdown(result: dict[str, Any]) -> str:
    notes = {
        "mla": "latent [c, k_pe] (kvrun default)",
        "mla-disabled": "VLLM_MLA_DISABLE=1: every head's key and value",
        "mha": "plain multi-head attention, 16 heads of 128",
    }
    lines = [
        "| cache | bytes/token/layer | bytes/token, 27 layers | x plain MHA | layer tensor "
        "(16 blocks) | dtype |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result.items():
        lines.append(
            f"| {name}: {notes[name]} | {r['bytes_per_token_layer']:,} | "
            f"{r['bytes_per_token_27_layers']:,} | {r['x_mha']:.3f} | "
            f"{r['layer_shape']} | {r['cache_dtype']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args(argv)
    result = measure_all()
    print(json.dumps(result) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
