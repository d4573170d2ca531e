"""Weights and config from a single GGUF file (llama.cpp's format).

Quantized tensors are dequantized at load with the ``gguf`` package, so the model
code sees plain Hugging Face parameters. llama.cpp's converter permutes the rows of
Llama's Q and K projections to suit its interleaved rotary; we undo that here, as
transformers does, so the weights equal what transformers loads from the same file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrun.errors import ModelLoadError
from kvrun.loader.hf_config import normalize_hf_config

__all__ = [
    "GGUF_ARCHITECTURES",
    "SUPPORTED_GGUF_TYPES",
    "GgufArch",
    "check_gguf_tensors",
    "gguf_hf_config",
    "iter_gguf",
    "open_gguf",
    "read_gguf_metadata",
    "read_gguf_metadata_key",
    "unpermute_rotary",
]

# Tensor types the loader dequantizes (gguf.GGMLQuantizationType names).
SUPPORTED_GGUF_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


@dataclass(frozen=True)
class GgufArch:
    """How one GGUF ``general.architecture`` maps onto a Hugging Face model class."""

    hf_class: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    rotary_permuted: bool  # llama.cpp permuted Q/K rows for its interleaved (non-NeoX) rotary


GGUF_ARCHITECTURES: Mapping[str, GgufArch] = {
    "llama": GgufArch("LlamaForCausalLM", "llama", rotary_permuted=True),
    "qwen2": GgufArch("Qwen2ForCausalLM", "qwen2", rotary_permuted=False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama3's per-frequency rope factors: transformers recomputes them from rope_scaling.
_SKIPPED = frozenset({"rope_freqs.weight"})


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` whose tensors all lie inside the file."""
    import gguf

    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not the magic b'GGUF'"
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/... on damage
        raise ModelLoadError(
            f"{path} is truncated or corrupt: the GGUF reader failed: {exc}"
        ) from exc
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelLoadError(
                f"{path} is truncated: tensor {tensor.name!r} needs bytes up to "
                f"{tensor.data_offset + tensor.n_bytes} but the file has {size}"
            )
    return reader


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (header fields left out)."""
    return {
        key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
    }


def _arch(metadata: Mapping[str, Any], path: Path) -> tuple[str, GgufArch]:
    name = metadata.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(str(name))
    if arch is None:
        raise ModelLoadError(
            f"{path}: GGUF architecture {name!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return str(name), arch


def gguf_hf_config(
    metadata: Mapping[str, Any], tensor_names: Sequence[str], path: Path
) -> dict[str, Any]:
    """A Hugging Face config.json dict synthesized from the GGUF metadata."""
    name, arch = _arch(metadata, path)

    def key(suffix: str, default: Any = None) -> Any:
        return metadata.get(f"{name}.{suffix}", default)

    def need(suffix: str) -> Any:
        if f"{name}.{suffix}" not in metadata:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {name}.{suffix}")
        return metadata[f"{name}.{suffix}"]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", key("rope.dimension_count", hidden // heads))
    vocab = key("vocab_size")
    if vocab is None:
        vocab = len(metadata.get("tokenizer.ggml.tokens", ()))
    names = set(tensor_names)
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        # the stored float32 value, widened exactly as transformers reads it
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(key),
        "max_position_embeddings": int(key("context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        # GGUF weights are dequantized to float32, as transformers does
        "torch_dtype": "float32",
        "mlp_bias": False,
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    window = key("attention.sliding_window")
    if window is not None:
        config["sliding_window"] = int(window)
    return normalize_hf_config(config)


def _rope_scaling(key: Any) -> dict[str, Any] | None:
    kind = key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {
        "rope_type": str(kind),
        "factor": float(key("rope.scaling.factor", 1.0)),
    }
    original = key("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def check_gguf_tensors(reader: Any, path: Path) -> list[str]:
    """Fail on a tensor we cannot map or dequantize; returns the tensor names."""
    names = []
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_GGUF_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has GGUF type {type_name}, which kvrun cannot "
                f"dequantize; supported types: {', '.join(SUPPORTED_GGUF_TYPES)}"
            )
        if tensor.name not in _SKIPPED:
            _hf_name(tensor.name, path)
        names.append(tensor.name)
    return names


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(
            f"{path}: GGUF tensor {gguf_name!r} has no Hugging Face counterpart that kvrun "
            f"knows; known per-layer tensors: {', '.join(sorted(_LAYER_NAMES))}"
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rotary(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``rows``: [num_heads * d, ...]).

    transformers pairs rotary dimensions i and i + d/2 of a head (NeoX style);
    llama.cpp pairs 2i and 2i + 1, so its converter interleaved each head's two
    halves: GGUF row 2i is HF row i, GGUF row 2i + 1 is HF row i + d/2.
    """
    shape = rows.shape
    half = shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf(
    path: Path, hf_config: Mapping[str, Any], dtype: torch.dtype, reader: Any = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, dequantized tensor in ``dtype``) for every GGUF tensor.

    ``reader`` is the already opened ``open_gguf(path)``, when the caller has one.
    """
    from gguf.quants import dequantize

    if reader is None:
        reader = open_gguf(path)
    arch = GGUF_ARCHITECTURES[str(read_gguf_metadata_key(reader, "general.architecture"))]
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config["num_key_value_heads"])
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED:
            continue
        name = _hf_name(tensor.name, path)
        values = dequantize(tensor.data, tensor.tensor_type)
        if arch.rotary_permuted and ".self_attn.q_proj." in name:
            values = unpermute_rotary(values, heads)
        elif arch.rotary_permuted and ".self_attn.k_proj." in name:
            values = unpermute_rotary(values, kv_heads)
        array = np.ascontiguousarray(values, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors are read-only views of the memory map
            array = array.copy()
        yield name, torch.from_numpy(array).to(dtype)


def read_gguf_metadata_key(reader: Any, key: str) -> Any:
    """One metadata value, without decoding the (large) tokenizer arrays."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()
