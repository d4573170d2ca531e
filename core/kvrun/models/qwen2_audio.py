"""Qwen2-Audio as kvrun code: its Whisper-style audio encoder and the Qwen2 decoder.

The encoder reads a clip's log-mel features over its whole window (``2 x
max_source_positions`` frames, the feature extractor pads to it): two 1-D convolutions
(kernel 3, the second with stride 2) with GELU, learned positions, pre-LayerNorm blocks
of bidirectional attention (q scaled before the product; k without bias) and a GELU MLP,
then average pooling of pairs and a LayerNorm; a linear projector maps each row to the
language model's hidden size. Rows past the clip's own frames are dropped: attention
covers the clip's conv rows only (transformers masks the padding rows as keys, which is
the same), and the clip keeps ``((frames - 1) // 2 + 1 - 2) // 2 + 1`` pooled rows, one
per ``<|AUDIO|>`` placeholder.

The language model is :class:`~kvrun.models.llama.LlamaForCausalLM`'s Qwen2 arithmetic
with ordinary rotary positions, so every step but those covering audio rows runs its
usual paths (fused decoder, decode graphs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from kvrun.attention.base import AttentionBackend
from kvrun.models.config import ModelConfig
from kvrun.models.media_lm import MediaCausalLM
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.distributed.layers import ModelParallel

__all__ = ["Qwen2AudioEncoder", "Qwen2AudioForConditionalGeneration"]


@dataclass
class AudioLayer:
    """One encoder layer's weights (matrices prepared by the platform once loaded)."""

    attn_norm: torch.Tensor  # [E] LayerNorm weight
    attn_norm_bias: torch.Tensor  # [E]
    qkv: Any  # [3 E, E] q | k | v
    qkv_bias: torch.Tensor  # [3 E] (k's part zero: k_proj has no bias)
    out: Any  # [E, E]
    out_bias: torch.Tensor  # [E]
    mlp_norm: torch.Tensor  # [E]
    mlp_norm_bias: torch.Tensor  # [E]
    fc1: Any  # [F, E]
    fc1_bias: torch.Tensor  # [F]
    fc2: Any  # [E, F]
    fc2_bias: torch.Tensor  # [E]


class Qwen2AudioEncoder:
    """Qwen2-Audio's encoder and projector: one clip's features -> its placeholder rows."""

    def __init__(
        self,
        audio: Mapping[str, Any],
        out_hidden: int,  # the language model's hidden size
        ops: OpTable,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.ops = ops
        self.dtype = dtype
        self.device = device
        self.embed_dim = e = int(audio["d_model"])
        self.num_heads = int(audio["encoder_attention_heads"])
        self.head_dim = e // self.num_heads
        self.mel_bins = mel = int(audio["num_mel_bins"])
        self.positions = int(audio["max_source_positions"])
        ffn = int(audio["encoder_ffn_dim"])

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        self.conv1 = empty(e, mel, 3)
        self.conv1_bias = empty(e)
        self.conv2 = empty(e, e, 3)
        self.conv2_bias = empty(e)
        self.embed_positions = empty(self.positions, e)
        self.layers = [
            AudioLayer(
                attn_norm=empty(e),
                attn_norm_bias=empty(e),
                qkv=empty(3 * e, e),
                qkv_bias=torch.zeros(3 * e, dtype=dtype, device=device),
                out=empty(e, e),
                out_bias=empty(e),
                mlp_norm=empty(e),
                mlp_norm_bias=empty(e),
                fc1=empty(ffn, e),
                fc1_bias=empty(ffn),
                fc2=empty(e, ffn),
                fc2_bias=empty(e),
            )
            for _ in range(int(audio["encoder_layers"]))
        ]
        self.norm = empty(e)
        self.norm_bias = empty(e)
        self.projector: Any = empty(out_hidden, e)
        self.projector_bias = empty(out_hidden)

    def destinations(self) -> dict[str, torch.Tensor]:
        """Hugging Face names -> our tensors."""
        e, p = self.embed_dim, "audio_tower."
        dest = {
            p + "conv1.weight": self.conv1,
            p + "conv1.bias": self.conv1_bias,
            p + "conv2.weight": self.conv2,
            p + "conv2.bias": self.conv2_bias,
            p + "embed_positions.weight": self.embed_positions,
            p + "layer_norm.weight": self.norm,
            p + "layer_norm.bias": self.norm_bias,
            "multi_modal_projector.linear.weight": self.projector,
            "multi_modal_projector.linear.bias": self.projector_bias,
        }
        for i, layer in enumerate(self.layers):
            q = f"{p}layers.{i}."
            dest.update(
                {
                    q + "self_attn_layer_norm.weight": layer.attn_norm,
                    q + "self_attn_layer_norm.bias": layer.attn_norm_bias,
                    q + "self_attn.q_proj.weight": layer.qkv[:e],
                    q + "self_attn.q_proj.bias": layer.qkv_bias[:e],
                    q + "self_attn.k_proj.weight": layer.qkv[e : 2 * e],
                    q + "self_attn.v_proj.weight": layer.qkv[2 * e :],
                    q + "self_attn.v_proj.bias": layer.qkv_bias[2 * e :],
                    q + "self_attn.out_proj.weight": layer.out,
                    q + "self_attn.out_proj.bias": layer.out_bias,
                    q + "final_layer_norm.weight": layer.mlp_norm,
                    q + "final_layer_norm.bias": layer.mlp_norm_bias,
                    q + "fc1.weight": layer.fc1,
                    q + "fc1.bias": layer.fc1_bias,
                    q + "fc2.weight": layer.fc2,
                    q + "fc2.bias": layer.fc2_bias,
                }
            )
        return dest

    def prepare(self) -> None:
        prepare = self.ops.prepare_linear
        self.projector = prepare(self.projector)
        for layer in self.layers:
            layer.qkv, layer.out = prepare(layer.qkv), prepare(layer.out)
            layer.fc1, layer.fc2 = prepare(layer.fc1), prepare(layer.fc2)

    def __call__(self, features: torch.Tensor, frames: int) -> torch.Tensor:
        """[mel, 2 * max_source_positions] features of a clip of ``frames`` mel frames ->
        [pooled rows, out_hidden]."""
        ops, e = self.ops, self.embed_dim
        x = features.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        x = F.gelu(F.conv1d(x, self.conv1, self.conv1_bias, padding=1))
        x = F.gelu(F.conv1d(x, self.conv2, self.conv2_bias, stride=2, padding=1))
        x = x[0].transpose(0, 1) + self.embed_positions  # [positions, E]
        rows = (frames - 1) // 2 + 1  # the clip's conv rows; the rest is padding
        x = x[:rows]
        scale = 1.0 / math.sqrt(self.head_dim)
        for layer in self.layers:
            y = F.layer_norm(x, (e,), layer.attn_norm, layer.attn_norm_bias, 1e-5)
            qkv = ops.linear(y, layer.qkv, layer.qkv_bias).view(rows, 3, self.num_heads, -1)
            q = qkv[:, 0].transpose(0, 1) * scale  # transformers scales q before the product
            k, v = qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
            attn = F.scaled_dot_product_attention(q, k, v, scale=1.0)
            x = x + ops.linear(attn.transpose(0, 1).reshape(rows, e), layer.out, layer.out_bias)
            y = F.layer_norm(x, (e,), layer.mlp_norm, layer.mlp_norm_bias, 1e-5)
            x = x + ops.linear(
                F.gelu(ops.linear(y, layer.fc1, layer.fc1_bias)), layer.fc2, layer.fc2_bias
            )
        pooled = F.avg_pool1d(x.transpose(0, 1).unsqueeze(0), 2, 2)[0].transpose(0, 1)
        pooled = F.layer_norm(pooled, (e,), self.norm, self.norm_bias, 1e-5)
        kept = (rows - 2) // 2 + 1
        out: torch.Tensor = ops.linear(pooled[:kept], self.projector, self.projector_bias)
        return out


class Qwen2AudioForConditionalGeneration(MediaCausalLM):
    """Qwen2-Audio: the audio encoder and the Qwen2 decoder (ordinary rotary).

    The runner calls :meth:`encode` for each clip (caching the rows by content hash),
    :meth:`embed_tokens` for a step's token rows, and ``forward`` with ``inputs_embeds``
    when a chunk covers audio rows."""

    lora_encoders: ClassVar[tuple[str, ...]] = ("audio_tower", "multi_modal_projector")

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        parallel: ModelParallel | None = None,  # the decoder's shard (kvrun.distributed)
    ) -> None:
        super().__init__(config, ops, attention, dtype, device, parallel)
        assert config.audio is not None
        self.audio_tower = self.encoder = Qwen2AudioEncoder(
            config.audio, config.hidden_size, ops, dtype, device
        )

    @staticmethod
    def canonical_name(name: str) -> str:
        """language_model.model.* / language_model.lm_head.* (as saved) and transformers
        5's model.language_model.* -> the Llama family's names."""
        for prefix, replacement in (
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("model.language_model.", "model."),
            ("model.audio_tower.", "audio_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ):
            if name.startswith(prefix):
                return replacement + name.removeprefix(prefix)
        return name

    def encode(self, modality: str, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One clip's placeholder rows [length, H]."""
        return self.audio_tower(data["input_features"], int(data["frames"]))
