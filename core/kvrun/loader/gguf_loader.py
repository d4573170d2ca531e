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
    "gguf_stored_types",
    "gguf_weight_count",
    "iter_gguf",
    "open_gguf",
    "read_gguf_metadata",
    "read_gguf_metadata_key",
    "read_rope_factors",
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
    # llama with {arch}.expert_count > 0 is Mixtral (see _MIXTRAL)
    "llama": GgufArch("LlamaForCausalLM", "llama", rotary_permuted=True),
    "qwen2": GgufArch("Qwen2ForCausalLM", "qwen2", rotary_permuted=False),
    "qwen3": GgufArch("Qwen3ForCausalLM", "qwen3", rotary_permuted=False),
    "qwen2moe": GgufArch("Qwen2MoeForCausalLM", "qwen2_moe", rotary_permuted=False),
    "qwen3moe": GgufArch("Qwen3MoeForCausalLM", "qwen3_moe", rotary_permuted=False),
    "gemma2": GgufArch("Gemma2ForCausalLM", "gemma2", rotary_permuted=False),
    "gemma3": GgufArch("Gemma3ForCausalLM", "gemma3_text", rotary_permuted=False),
    "phi3": GgufArch("Phi3ForCausalLM", "phi3", rotary_permuted=False),
}
# Phi-3 keeps q|k|v and gate|up merged, in llama.cpp's files as in transformers'.
_PHI3_NAMES = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# LongRoPE's per-frequency factors, stored as tensors; they go into the config.
_ROPE_FACTORS = {
    "rope_factors_long.weight": "long_factor",
    "rope_factors_short.weight": "short_factor",
}
_GEMMA = ("gemma2", "gemma3")
# llama.cpp's converter stores Gemma's norm weights as 1 + w (it scales by them as they
# are); the model code takes Hugging Face's w, so the loader subtracts 1 as transformers
# does. Its pre-MLP norm is ffn_norm, where Llama's ffn_norm is post_attention_layernorm.
_GEMMA_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_MIXTRAL = GgufArch("MixtralForCausalLM", "mixtral", rotary_permuted=True)
# llama.cpp renormalizes the chosen experts' weights for these (Mixtral always does).
_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}

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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    # mixtures: the router and Qwen2-MoE's shared expert (Mixtral's names in _MIXTRAL_NAMES)
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# The experts stacked in one [E, ...] tensor: each becomes E Hugging Face tensors.
_STACKED = {
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
}
_MIXTRAL_NAMES = {
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama3's per-frequency rope factors: transformers recomputes them from rope_scaling.
_SKIPPED = frozenset({"rope_freqs.weight", *_ROPE_FACTORS})


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
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (llama with experts: Mixtral)"
        )
    if name == "llama" and int(metadata.get("llama.expert_count") or 0) > 0:
        arch = _MIXTRAL
    return str(name), arch


def read_rope_factors(reader: Any) -> dict[str, list[float]]:
    """LongRoPE's long and short factors (Phi-3), from their tensors; {} when absent."""
    return {
        _ROPE_FACTORS[t.name]: [float(x) for x in np.asarray(t.data, dtype=np.float32)]
        for t in reader.tensors
        if t.name in _ROPE_FACTORS
    }


def gguf_hf_config(
    metadata: Mapping[str, Any],
    tensor_names: Sequence[str],
    path: Path,
    rope_factors: Mapping[str, list[float]] | None = None,
) -> dict[str, Any]:
    """A Hugging Face config.json dict synthesized from the GGUF metadata (and, for
    LongRoPE, the factor tensors :func:`read_rope_factors` read)."""
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
    experts = int(key("expert_count") or 0)
    if name in _GEMMA:
        config.update(_gemma_config(name, key, config))
    if rope_factors:  # Phi-3's LongRoPE
        original = int(
            key("rope.scaling.original_context_length", config["max_position_embeddings"])
        )
        config["original_max_position_embeddings"] = original
        config["rope_scaling"] = {"rope_type": "longrope", **rope_factors}
        config["rope_scaling"]["original_max_position_embeddings"] = original
        if key("rope.scaling.attn_factor") is not None:
            config["rope_scaling"]["attention_factor"] = float(key("rope.scaling.attn_factor"))
    if experts:
        config["num_experts_per_tok"] = int(need("expert_used_count"))
        config["norm_topk_prob"] = _NORM_TOPK.get(name, True)
        if arch.model_type == "mixtral":
            config["num_local_experts"] = experts
        else:
            config["num_experts"] = experts
            config["moe_intermediate_size"] = int(
                key("expert_feed_forward_length", config["intermediate_size"])
            )
            shared = key("expert_shared_feed_forward_length")
            if shared:
                config["shared_expert_intermediate_size"] = int(shared)
            # the layers whose MLP is dense: those without a router
            config["mlp_only_layers"] = [
                i
                for i in range(config["num_hidden_layers"])
                if f"blk.{i}.ffn_gate_inp.weight" not in names
            ]
    window = key("attention.sliding_window")
    if window is not None:
        config["sliding_window"] = int(window)
    return normalize_hf_config(config)


def _gemma_config(name: str, key: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2/3's fields. llama.cpp stores no query_pre_attn_scalar: it scales by the
    head size, except for the 27B models (Gemma 2: 46 layers, Gemma 3: 62), which scale by
    hidden / heads; kvrun derives it the same way."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    big = layers == (46 if name == "gemma2" else 62)
    fields: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config["hidden_size"] // heads if big else config["head_dim"],
        "attn_logit_softcapping": key("attn_logit_softcapping"),
        "final_logit_softcapping": key("final_logit_softcapping"),
    }
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: true = sliding window
        fields["layer_types"] = [
            "sliding_attention" if local else "full_attention" for local in pattern
        ]
    elif pattern is not None:
        fields["sliding_window_pattern"] = int(pattern)
    if name == "gemma3":
        fields["rope_local_base_freq"] = 10000.0  # llama.cpp's fixed local rope base
    return fields


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
        if tensor.name not in _SKIPPED and tensor.name not in _GLOBAL_NAMES:
            _layer_part(tensor.name, path)
        names.append(tensor.name)
    return names


class _Naming:
    """How one file's per-layer tensor names read (llama.cpp shares names across
    architectures whose Hugging Face names differ)."""

    def __init__(self, hf_config: Mapping[str, Any]) -> None:
        model_type = hf_config.get("model_type")
        self.experts = int(hf_config.get("num_local_experts") or hf_config.get("num_experts") or 1)
        self.parts: dict[str, str] = {**_LAYER_NAMES, **_STACKED}
        if model_type == "mixtral":
            self.parts.update(_MIXTRAL_NAMES)
        self.gemma = model_type in ("gemma2", "gemma3_text")
        if self.gemma:
            self.parts.update(_GEMMA_NAMES)
        if model_type == "phi3":
            self.parts.update(_PHI3_NAMES)

    def hf_names(self, gguf_name: str, path: Path) -> list[str]:
        """The Hugging Face name(s) of a tensor: one, or one per expert of a stack."""
        if gguf_name in _GLOBAL_NAMES:
            return [_GLOBAL_NAMES[gguf_name]]
        layer, part, kind = _layer_part(gguf_name, path)
        if part not in self.parts:
            raise ModelLoadError(
                f"{path}: GGUF tensor {gguf_name!r} is not part of this architecture's layers"
            )
        template = f"model.layers.{layer}.{self.parts[part]}.{kind}"
        if part in _STACKED:
            return [template.format(e=e) for e in range(self.experts)]
        return [template]


def _layer_part(gguf_name: str, path: Path) -> tuple[str, str, str]:
    """(layer, part, weight|bias) of a per-layer tensor name known to some architecture."""
    match = _LAYER_RE.fullmatch(gguf_name)
    known = sorted({*_LAYER_NAMES, *_STACKED, *_GEMMA_NAMES, *_PHI3_NAMES})
    if match is None or match.group(2) not in known:
        raise ModelLoadError(
            f"{path}: GGUF tensor {gguf_name!r} has no Hugging Face counterpart that kvrun "
            f"knows; known per-layer tensors: {', '.join(known)}"
        )
    layer, part, kind = match.groups()
    return layer, part, kind


def gguf_weight_count(names: Sequence[str], hf_config: Mapping[str, Any], path: Path) -> int:
    """How many Hugging Face tensors :func:`iter_gguf` yields for these GGUF tensors."""
    naming = _Naming(hf_config)
    return sum(len(naming.hf_names(n, path)) for n in names if n not in _SKIPPED)


def unpermute_rotary(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``rows``: [num_heads * d, ...]).

    transformers pairs rotary dimensions i and i + d/2 of a head (NeoX style);
    llama.cpp pairs 2i and 2i + 1, so its converter interleaved each head's two
    halves: GGUF row 2i is HF row i, GGUF row 2i + 1 is HF row i + d/2.
    """
    shape = rows.shape
    half = shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_stored_types(reader: Any, hf_config: Mapping[str, Any], path: Path) -> dict[str, str]:
    """Hugging Face name -> the GGUF type its tensor is stored in ("Q4_1", "F32"), for
    every tensor that is one Hugging Face tensor (stacked experts left out)."""
    naming = _Naming(hf_config)
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED:
            continue
        names = naming.hf_names(tensor.name, path)
        if len(names) == 1 and not (
            tensor.name.startswith("blk.") and _layer_part(tensor.name, path)[1] in _STACKED
        ):
            types[names[0]] = tensor.tensor_type.name
    return types


def iter_gguf(
    path: Path,
    hf_config: Mapping[str, Any],
    dtype: torch.dtype,
    reader: Any = None,
    keep_quantized: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, Any]]:
    """Yield (Hugging Face name, dequantized tensor in ``dtype``) for every GGUF tensor;
    the names in ``keep_quantized`` (matrices in one of
    :data:`kvrun.quantization.EXECUTABLE_GGUF_TYPES`) as a
    :class:`kvrun.quantization.QuantizedMatrix` of their blocks instead.

    ``reader`` is the already opened ``open_gguf(path)``, when the caller has one.
    """
    from gguf.quants import dequantize

    from kvrun.quantization import QuantizedMatrix

    if reader is None:
        reader = open_gguf(path)
    arch = GGUF_ARCHITECTURES[str(read_gguf_metadata_key(reader, "general.architecture"))]
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config["num_key_value_heads"])
    naming = _Naming(hf_config)
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED:
            continue
        names = naming.hf_names(tensor.name, path)
        if len(names) == 1 and names[0] in keep_quantized:
            rows = np.asarray(tensor.data)  # uint8 [out, blocks * bytes]: rows are whole
            if arch.rotary_permuted and ".self_attn.q_proj." in names[0]:
                rows = unpermute_rotary(rows, heads)
            elif arch.rotary_permuted and ".self_attn.k_proj." in names[0]:
                rows = unpermute_rotary(rows, kv_heads)
            blocks = torch.from_numpy(np.array(rows, dtype=np.uint8, copy=True))
            yield names[0], QuantizedMatrix(tensor.tensor_type.name, blocks, int(tensor.shape[0]))
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        if naming.gemma and tensor.name.endswith("norm.weight"):
            values = values - 1.0  # stored as 1 + w (see _GEMMA_NAMES)
        if arch.rotary_permuted and ".self_attn.q_proj." in names[0]:
            values = unpermute_rotary(values, heads)
        elif arch.rotary_permuted and ".self_attn.k_proj." in names[0]:
            values = unpermute_rotary(values, kv_heads)
        if names[0].endswith("shared_expert_gate.weight"):
            values = values.reshape(1, -1)  # llama.cpp stores the [1, H] gate as [H]
        stacked = tensor.name.startswith("blk.") and _layer_part(tensor.name, path)[1] in _STACKED
        parts = list(values) if stacked else [values]  # a stack: one matrix per expert
        if len(parts) != len(names):
            raise ModelLoadError(
                f"{path}: GGUF tensor {tensor.name!r} stacks {len(parts)} experts; the "
                f"metadata says {len(names)}"
            )
        for name, part in zip(names, parts, strict=True):
            array = np.ascontiguousarray(part, dtype=np.float32)
            if not array.flags.writeable:  # F32 tensors are read-only views of the memory map
                array = array.copy()
            yield name, torch.from_numpy(array).to(dtype)


def read_gguf_metadata_key(reader: Any, key: str) -> Any:
    """One metadata value, without decoding the (large) tokenizer arrays."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()
