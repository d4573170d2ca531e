"""The model shape kvrun needs, read from a Hugging Face config.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvrun.errors import ModelLoadError
from kvrun.models.rope import rope_context_length, rope_type

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama family (Llama, Mistral, Qwen2/3, Phi-3), as
    the kvrun model code sees it."""

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
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotation (Qwen3)
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE); num_experts 0 = a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # experts each token is routed to
    moe_intermediate_size: int = 0  # one expert's intermediate size
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0 = none
    norm_topk_prob: bool = True  # renormalize the chosen experts' weights to sum to 1
    moe_layers: tuple[bool, ...] = ()  # per layer: its MLP is a mixture (else dense)
    # Tokens per fused_moe call (VLLM_FUSED_MOE_CHUNK_SIZE); set by the engine builder.
    moe_chunk_size: int = 32768
    # Gemma 2/3: attention scale query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5),
    # soft-capped attention scores and logits, a window per layer (None: global), the
    # local layers' own rope theta (Gemma 3), the MLP's activation.
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()
    local_rope_theta: float | None = None
    hidden_act: str = "silu"
    # Embeddings may be cut to fewer dimensions (Matryoshka): True for any, or the sizes
    # the model was trained for (config.json's is_matryoshka / matryoshka_dimensions).
    matryoshka: tuple[int, ...] | bool = False
    # *ForSequenceClassification: the classes its score head outputs, by index.
    id2label: tuple[str, ...] = ()
    # Multimodal models (Qwen2-VL, Qwen2.5-VL, Qwen2-Audio): the media a prompt may carry
    # besides text ("image", "video", "audio"; empty for a text-only model), the vision
    # tower's config.json section, the placeholder tokens the processor expands, and
    # M-RoPE's split of the rotary frequencies into (t, h, w) sections (empty: ordinary
    # rotary).
    accepted_modalities: frozenset[str] = frozenset()
    vision: Mapping[str, Any] | None = None
    image_token_id: int = -1
    video_token_id: int = -1
    vision_start_token_id: int = -1
    mrope_section: tuple[int, ...] = ()
    # Qwen2-Audio: the audio encoder's config.json section and its placeholder token.
    audio: Mapping[str, Any] | None = None
    audio_token_id: int = -1

    @property
    def attention_scale(self) -> float:
        if self.softmax_scale is not None:
            return self.softmax_scale
        return 1.0 / math.sqrt(float(self.query_pre_attn_scalar or self.head_dim))

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # Mixture routing beyond softmax-top-k (DeepSeek): the weights' scale, and
    # "group_limited_greedy" top-k within the best topk_group of n_group expert groups
    # (V2: a group's best score ranks it); "noaux_tc" (V3): sigmoid scores, the experts
    # chosen by score + the router's e_score_correction_bias within the topk_group groups
    # whose two best biased scores sum highest, weighted by the unbiased scores.
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"  # "sigmoid" (DeepSeek-V3)
    # Multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0 = none). The cache then
    # holds num_kv_heads x head_dim per token as the mode says: "absorbed" (one kv head
    # of kv_lora_rank + qk_rope_head_dim: the latent and the rotated rope key) or "mha"
    # (VLLM_MLA_DISABLE=1: every head's key, values padded to the key's size).
    q_lora_rank: int = 0  # 0: q is one projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mla_mode: str = "absorbed"
    # absorbed: W_q . W_UK and W_UV . W_o multiplied once at load
    # (VLLM_MLA_PERFORM_MATRIX_ABSORPTION), else applied one after the other per step
    mla_fused: bool = True
    # transformers rotates q_pe/k_pe in interleaved pairs (DeepSeek-V2; V3's
    # rope_interleave, its default), else in halves
    mla_rope_interleaved: bool = True
    # fp8 checkpoints (quantization_config quant_method "fp8"): the weights' block shape
    # [rows, columns], dequantized at load (kvrun.loader.fp8); None: not fp8
    fp8_weight_block: tuple[int, int] | None = None
    # fp8 + absorbed at load: round the absorbed MLA matrices back onto the fp8 block
    # grid, as vLLM requantizes them (False: VLLM_MLA_DISABLE_REQUANTIZATION=1)
    mla_requantize: bool = True
    softmax_scale: float | None = None  # overrides attention_scale (MLA: yarn's mscale^2)
    # Positions the rotary tables cover beyond the model's context: the engine's
    # max_model_len when VLLM_ALLOW_LONG_MAX_MODEL_LEN lets it exceed that (0: none).
    serve_positions: int = 0

    # max_position_embeddings already states the scaled context (Gemma 3's linear rope)
    context_is_scaled: bool = False

    @property
    def rope_context_length(self) -> int:
        """The context the rope scaling extends the model to (vLLM's derived length)."""
        if self.context_is_scaled:
            return self.max_position_embeddings
        return rope_context_length(self.rope_scaling, self.max_position_embeddings)

    @property
    def rope_table_positions(self) -> int:
        """Rows of the models' rotary tables: every position a request may reach."""
        return max(self.max_position_embeddings, self.rope_context_length, self.serve_positions)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> ModelConfig:
        """Read the fields from a config.json dict; ``source`` names the checkpoint in errors."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ModelLoadError(f"{source}: config.json has no 'architectures' list")
        multimodal = _multimodal_fields(hf, source)
        if multimodal:  # the language model's fields are in text_config
            hf = {**hf.get("text_config", {}), **_top_level(hf)}

        def need(key: str) -> Any:
            if key not in hf:
                raise ModelLoadError(f"{source}: config.json lacks {key!r}")
            return hf[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        model_type = hf.get("model_type", "")
        bias_default = model_type in _QWEN2_BIAS
        window = hf.get("sliding_window")
        if model_type in _OPT_IN_WINDOW and not hf.get("use_sliding_window", False):
            window = None
        rope_params = hf.get("rope_parameters")
        partial = hf.get("partial_rotary_factor")
        if partial is None and isinstance(rope_params, Mapping):
            partial = rope_params.get("partial_rotary_factor")
        if partial not in (None, 1, 1.0):
            raise ModelLoadError(
                f"{source}: partial_rotary_factor={partial} is not supported (kvrun rotates "
                "whole heads: 1.0)"
            )
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
            "mrope",  # Qwen2-VL's older spelling: M-RoPE over default frequencies
        ):
            rope_scaling = None
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            if "original_max_position_embeddings" in hf:  # Phi-3 keeps it beside the dict
                rope_scaling.setdefault(
                    "original_max_position_embeddings", hf["original_max_position_embeddings"]
                )
            try:
                rope_type(rope_scaling)
            except ModelLoadError as exc:
                raise ModelLoadError(f"{source}: {exc}") from None
        num_layers = int(need("num_hidden_layers"))
        fields: dict[str, Any] = {
            "architecture": str(architectures[0]),
            "vocab_size": int(need("vocab_size")),
            "hidden_size": hidden,
            "intermediate_size": int(need("intermediate_size")),
            "num_layers": num_layers,
            "num_heads": heads,
            "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or hidden // heads),
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(rope_theta if rope_theta is not None else 10000.0),
            "rope_scaling": rope_scaling,
            "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "attention_bias": bool(hf.get("attention_bias", bias_default)),
            "sliding_window": int(window) if window else None,
            "qk_norm": model_type in _QK_NORM,
            "id2label": _labels(hf) if str(architectures[0]).endswith(_CLASSIFIER) else (),
            "matryoshka": (
                tuple(int(d) for d in hf["matryoshka_dimensions"])
                if hf.get("matryoshka_dimensions")
                else bool(hf.get("is_matryoshka", False))
            ),
        }
        fields.update(_moe_fields(hf, model_type, num_layers, source))
        fields.update(_gemma_fields(hf, model_type, num_layers, source))
        fields.update(_deepseek_fields(hf, model_type, num_layers, source))
        fields["fp8_weight_block"] = _fp8_weight_block(hf)
        fields.update(multimodal)
        return cls(**fields)


# The multimodal architectures kvrun runs, by config.json model_type, and the media each
# accepts.
_MULTIMODAL = {
    "qwen2_vl": frozenset({"image", "video"}),
    "qwen2_5_vl": frozenset({"image", "video"}),
    "qwen2_audio": frozenset({"audio"}),
}


def _top_level(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal config's own keys, minus its sub-configs (they win over text_config's
    for the keys both have: architectures, model_type, tie_word_embeddings)."""
    return {
        k: v for k, v in hf.items() if k not in ("text_config", "vision_config", "audio_config")
    }


def _multimodal_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Qwen2-VL's vision tower, placeholder tokens and M-RoPE sections, Qwen2-Audio's
    encoder and placeholder ({} for text-only models)."""
    model_type = hf.get("model_type", "")
    if model_type not in _MULTIMODAL:
        return {}
    if model_type == "qwen2_audio":
        audio = hf.get("audio_config")
        token = hf.get("audio_token_id", hf.get("audio_token_index"))
        if not isinstance(audio, Mapping) or token is None:
            raise ModelLoadError(
                f"{source}: a {model_type} config.json needs audio_config and audio_token_index"
            )
        return {
            "accepted_modalities": _MULTIMODAL[model_type],
            "audio": dict(audio),
            "audio_token_id": int(token),
        }
    vision = hf.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ModelLoadError(f"{source}: a {model_type} config.json needs a vision_config")
    text = hf.get("text_config") or {}
    params = text.get("rope_parameters") or hf.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or hf.get("rope_scaling") or {}
    section = params.get("mrope_section") or scaling.get("mrope_section")
    if not section:
        raise ModelLoadError(f"{source}: a {model_type} config.json needs rope mrope_section")
    ids = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        if key not in hf:
            raise ModelLoadError(f"{source}: a {model_type} config.json lacks {key!r}")
        ids[key] = int(hf[key])
    return {
        "accepted_modalities": _MULTIMODAL[model_type],
        "vision": dict(vision),
        "mrope_section": tuple(int(s) for s in section),
        **ids,
    }


_CLASSIFIER = "ForSequenceClassification"


def _labels(hf: Mapping[str, Any]) -> tuple[str, ...]:
    """A classifier's label names in index order (id2label, else num_labels of LABEL_i)."""
    id2label = hf.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        return tuple(
            str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))
        )  # type: ignore[call-overload]
    return tuple(f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2))))


def _fp8_weight_block(hf: Mapping[str, Any]) -> tuple[int, int] | None:
    """An fp8 checkpoint's weight block shape (the loader checked the quantization_config
    before the model is built: kvrun.loader.fp8.fp8_config); None when not fp8."""
    quant = hf.get("quantization_config")
    if not isinstance(quant, Mapping) or str(quant.get("quant_method", "")).lower() != "fp8":
        return None
    rows, cols = quant.get("weight_block_size") or (128, 128)
    return int(rows), int(cols)


# DeepSeek routing by model_type: (scoring functions, topk methods) transformers runs.
# Its V2 class reads topk_method (softmax scores always); its V3 class always runs
# sigmoid scores with the correction bias and group-limited choice, whatever the config
# says, so a V3 config naming anything else would not mean what it says.
_DEEPSEEK_ROUTING = {
    "deepseek_v2": (("softmax",), ("greedy", "group_limited_greedy")),
    "deepseek_v3": (("sigmoid",), ("noaux_tc",)),
}


def _deepseek_fields(hf: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> Any:
    """DeepSeek-V2/V3's latent attention and routed experts (V2: softmax scores, greedy
    or group-limited by the best score; V3: sigmoid scores, the correction bias, groups
    ranked by their two best scores). The cache shape fields describe the absorbed mode."""
    if model_type not in _DEEPSEEK_ROUTING:
        return {}
    scorings, methods = _DEEPSEEK_ROUTING[model_type]
    v3 = model_type == "deepseek_v3"
    scoring = str(hf.get("scoring_func") or scorings[0])
    method = str(hf.get("topk_method") or methods[0])
    if scoring not in scorings or method not in methods:
        raise ModelLoadError(
            f"{source}: {model_type} routing scoring_func={scoring!r}, topk_method="
            f"{method!r} is not supported; supported: "
            + "; ".join(
                f"{t}: scoring_func {s[0]!r} with topk_method {', '.join(m)}"
                for t, (s, m) in _DEEPSEEK_ROUTING.items()
            )
        )
    kv_lora, rope = int(hf["kv_lora_rank"]), int(hf["qk_rope_head_dim"])
    nope, v = int(hf["qk_nope_head_dim"]), int(hf["v_head_dim"])
    if rope % 2:
        raise ModelLoadError(f"{source}: qk_rope_head_dim={rope} is odd; rotary needs pairs")
    scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scale = (nope + rope) ** -0.5
    if rope_type(scaling if scaling.get("rope_type", "default") != "default" else None) == "yarn":
        mscale_all_dim = float(scaling.get("mscale_all_dim") or 0)
        if mscale_all_dim:  # the non-rotary dims scaled too, as DeepSeek's reference does
            factor = float(scaling["factor"])
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale *= mscale * mscale
    experts = int(hf.get("n_routed_experts") or 0)
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    fields: dict[str, Any] = {
        "q_lora_rank": int(hf.get("q_lora_rank") or 0),
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "num_kv_heads": 1,
        "head_dim": kv_lora + rope,
        "softmax_scale": scale,
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mla_rope_interleaved": bool(hf.get("rope_interleave", True)) if v3 else True,
    }
    if experts:
        shared = int(hf.get("n_shared_experts") or 0) * int(hf["moe_intermediate_size"])
        fields.update(
            num_experts=experts,
            num_experts_per_tok=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            shared_expert_intermediate_size=shared,
            # transformers' DeepSeek-V2 router scales the chosen softmax weights, never
            # renormalizes them; V3's renormalizes where norm_topk_prob says (default)
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)) if v3 else False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            topk_method=method,
            scoring_func=scoring,
            n_group=int(hf.get("n_group") or 1),
            topk_group=int(hf.get("topk_group") or 1),
            moe_layers=tuple(i >= first_dense for i in range(num_layers)),
        )
    return fields


def _gemma_fields(hf: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> Any:
    """Gemma 2/3's attention, window and rope fields. Its sliding_window is per layer
    (``layer_types``, else Gemma 2's even layers and all but every sixth of Gemma 3), so
    it goes to layer_windows, not to the global sliding_window."""
    if model_type not in ("gemma2", "gemma3_text"):
        return {}
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if not types:
        pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
        local = (
            [i % 2 == 0 for i in range(num_layers)]
            if model_type == "gemma2"
            else [(i + 1) % pattern != 0 for i in range(num_layers)]
        )
        types = ["sliding_attention" if x else "full_attention" for x in local]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ModelLoadError(
            f"{source}: layer_types must name sliding_attention or full_attention for each "
            f"of the {num_layers} layers; got {types!r}"
        )
    fields: dict[str, Any] = {
        "sliding_window": None,
        "layer_windows": tuple(
            int(window) if t == "sliding_attention" and window else None for t in types
        ),
        "query_pre_attn_scalar": hf.get("query_pre_attn_scalar"),
        "attn_logit_softcap": hf.get("attn_logit_softcapping"),
        "final_logit_softcap": hf.get("final_logit_softcapping"),
        "hidden_act": str(
            hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        ),
    }
    params = hf.get("rope_parameters")
    if model_type == "gemma3_text":
        # its 128k context is max_position_embeddings; the global layers' linear factor
        # (8 from 4B up) stretches a 32k-trained rope to it, not the context beyond it
        fields["context_is_scaled"] = True
        if isinstance(params, Mapping) and "sliding_attention" in params:
            local, full = params["sliding_attention"], params.get("full_attention", {})
            if rope_type(local) != "default":
                raise ModelLoadError(
                    f"{source}: rope scaling of Gemma 3's local layers "
                    f"({rope_type(local)!r}) is not supported; only their default rope"
                )
            fields["local_rope_theta"] = float(local.get("rope_theta", 10000.0))
            fields["rope_theta"] = float(full.get("rope_theta", 1_000_000.0))
            scaling = dict(full) if rope_type(full) != "default" else None
            fields["rope_scaling"] = scaling
        else:
            fields["local_rope_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
    return fields


def _moe_fields(hf: Mapping[str, Any], model_type: str, num_layers: int, source: str) -> Any:
    """The mixture-of-experts fields of ModelConfig from Mixtral's or Qwen-MoE's keys."""
    fields: dict[str, Any]
    if model_type == "mixtral":
        experts = int(hf.get("num_local_experts") or 0)
        fields = {
            "moe_intermediate_size": int(hf["intermediate_size"]),
            "norm_topk_prob": True,
            "moe_layers": (True,) * num_layers,
        }
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        step = int(hf.get("decoder_sparse_step") or 1)
        dense = set(hf.get("mlp_only_layers") or ())
        fields = {
            "moe_intermediate_size": int(hf.get("moe_intermediate_size") or 0),
            "shared_expert_intermediate_size": int(hf.get("shared_expert_intermediate_size") or 0),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "moe_layers": tuple(
                i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
            ),
        }
    else:
        return {}
    top_k = int(hf.get("num_experts_per_tok") or 0)
    intermediate = int(fields["moe_intermediate_size"])
    if experts <= 0 or not 0 < top_k <= experts or intermediate <= 0:
        raise ModelLoadError(
            f"{source}: a {model_type} config needs experts > 0, 0 < num_experts_per_tok <= "
            f"experts and an expert intermediate size; got experts={experts}, "
            f"num_experts_per_tok={top_k}, intermediate={intermediate}"
        )
    return {**fields, "num_experts": experts, "num_experts_per_tok": top_k}


# Model types whose config carries a sliding_window that applies only with
# use_sliding_window (Qwen's); and those with per-head q/k norms.
# Model types whose q/k/v projections carry a bias unless attention_bias says otherwise.
_QWEN2_BIAS = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio"})
_OPT_IN_WINDOW = frozenset(
    {"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen2_vl", "qwen2_5_vl", "qwen2_audio"}
)
_QK_NORM = frozenset({"qwen3", "qwen3_moe", "gemma3_text"})
