"""The model shape kvrun needs, read from a Hugging Face config.json."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvrun.errors import ModelLoadError

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama family, as the kvrun model code sees it."""

    architecture: str  # the checkpoint's architectures[0], e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # Hugging Face rope_scaling dict, None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None  # Mistral-style window, None when attention is global

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> ModelConfig:
        """Read the fields from a config.json dict; ``source`` names the checkpoint in errors."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ModelLoadError(f"{source}: config.json has no 'architectures' list")

        def need(key: str) -> Any:
            if key not in hf:
                raise ModelLoadError(f"{source}: config.json lacks {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        model_type = hf.get("model_type", "")
        bias_default = model_type == "qwen2"
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        rope_theta = hf.get("rope_theta")
        rope_scaling = hf.get("rope_scaling")
        # transformers 5 moves rope settings into "rope_parameters".
        params = hf.get("rope_parameters")
        if isinstance(params, Mapping):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
            None,
            "default",
        ):
            rope_scaling = None
        return cls(
            architecture=str(architectures[0]),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", bias_default)),
            sliding_window=int(window) if window else None,
        )
