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
import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from kvrun.errors import ModelLoadError

__all__ = ["check_remote_code", "normalize_hf_config", "read_config_json", "read_json_object"]

logger = logging.getLogger(__name__)


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


def check_remote_code(
    hf_config: Mapping[str, Any],
    source: str,
    *,
    trust_remote_code: bool,
    native_architectures: Collection[str],
) -> None:
    """Refuse a config.json that asks for its checkpoint's own Python (``auto_map``) unless
    ``trust_remote_code`` is set and its architectures are ones kvrun implements itself;
    then log that the checkpoint's code is not used. kvrun never runs a checkpoint's code.
    """
    auto_map = hf_config.get("auto_map")
    if not auto_map:
        return
    architectures = [str(a) for a in hf_config.get("architectures") or []]
    # The model class comes from architectures[0], as ModelConfig reads it.
    architecture = architectures[0] if architectures else None
    classes = (
        ", ".join(sorted(map(str, auto_map.values()))) if isinstance(auto_map, Mapping) else ""
    )
    shown = classes or repr(auto_map)
    asks = f"its config.json has an 'auto_map' ({shown}): it asks for the "
    asks += "checkpoint's own Python code, and kvrun never runs a checkpoint's code"
    supported = ", ".join(sorted(native_architectures))
    if architecture not in native_architectures:
        raise ModelLoadError(
            f"model {source!r}: {asks}. Its architecture {architecture!r} is not one kvrun "
            f"implements natively (supported: {supported}), so it cannot be loaded"
        )
    if not trust_remote_code:
        raise ModelLoadError(
            f"model {source!r}: {asks}. Its architecture {architecture} is one kvrun implements "
            "natively: pass trust_remote_code=True (--trust-remote-code) to load it with "
            f"kvrun's own implementation instead (supported natively: {supported})"
        )
    logger.warning(
        "model %s: trust_remote_code=True, but kvrun never runs a checkpoint's code: its "
        "auto_map (%s) is ignored and %s is loaded with kvrun's own implementation",
        source,
        classes,
        architecture,
    )


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
