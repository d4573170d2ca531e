"""Reading a Hugging Face config.json into the one dict shape the model code reads.

Checkpoints in the wild spell the same facts several ways: older ones carry
``rope_theta`` and ``rope_scaling`` (with ``type`` or ``rope_type``), transformers 5
writes ``rope_parameters`` instead, ``head_dim`` and ``num_key_value_heads`` are often
left out, and the dtype is ``torch_dtype`` or ``dtype``. :func:`normalize_hf_config`
keeps every original key and adds the missing spellings, so callers can read any one
of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvrun.errors import ModelLoadError

__all__ = ["normalize_hf_config", "read_config_json", "read_json_object"]


def read_json_object(path: Path, source: str) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; a ModelLoadError names the file otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model {source!r}: cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(
            f"model {source!r}: {path} holds a {type(raw).__name__}, not an object"
        )
    return raw


def read_config_json(path: Path, source: str) -> dict[str, Any]:
    """Parse ``path`` (a config.json) and check it names the model's architecture."""
    raw = read_json_object(path, source)
    architectures = raw.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise ModelLoadError(
            f"model {source!r}: {path} has no 'architectures' list (got {architectures!r}); "
            'a causal LM config names its class, e.g. "architectures": ["LlamaForCausalLM"]'
        )
    return normalize_hf_config(raw)


def normalize_hf_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with rope, head and dtype keys present in every spelling.

    Added when missing: ``rope_theta`` (float), ``rope_scaling`` (dict with
    ``rope_type``, or None for plain RoPE), ``rope_parameters`` (transformers 5
    form), ``head_dim``, ``num_key_value_heads``, ``tie_word_embeddings``,
    ``torch_dtype`` and ``dtype``.
    """
    config = dict(raw)
    theta, scaling = _rope(config)
    config.setdefault("rope_theta", theta)
    config["rope_scaling"] = scaling
    params: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    if scaling is not None:
        params.update(scaling)
    config.setdefault("rope_parameters", params)

    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads > 0:
        if config.get("num_key_value_heads") is None:
            config["num_key_value_heads"] = heads
        hidden = config.get("hidden_size")
        if config.get("head_dim") is None and isinstance(hidden, int):
            config["head_dim"] = hidden // heads
    config.setdefault("tie_word_embeddings", False)
    dtype = config.get("torch_dtype") or config.get("dtype")
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return config


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from whichever spelling the config uses."""
    params = config.get("rope_parameters")
    params = dict(params) if isinstance(params, Mapping) else {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, Mapping):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling = dict(scaling)
    # Older configs say "type"; transformers has read "rope_type" since 4.45.
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    return float(theta), scaling
