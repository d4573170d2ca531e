"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as kvrun code.

Weights are plain tensors, not nn.Modules: one step is a fixed sequence of
kernel calls, and module dispatch would only add overhead to it. The
projections that read the same input are merged (q|k|v, gate|up) so each layer
runs four matmuls. Every kernel comes from the platform's op table and the
attention from the platform's backend.

Once loaded, every matrix is handed to the platform's ``prepare_linear`` op and kept
in the form it returns (a packed layout on the cpu plugin): the model then reads
matrices only through ``linear`` and ``embedding``. A tied lm_head is the same
prepared object as the embedding table.

The model declares the fused-decoder layout (:mod:`kvrun.models.layout`): a platform's
fused decoder (:meth:`kvrun.Platform.fused_decoder`) may read its weights directly,
because its arithmetic is exactly the layout's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.errors import ModelLoadError
from kvrun.models.config import ModelConfig
from kvrun.models.layout import DECODER_LAYOUT
from kvrun.models.rope import cos_sin_cache
from kvrun.ops import OpTable

__all__ = ["LlamaForCausalLM", "LlamaLayer", "dense_block"]

DenseBlock = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LlamaLayer:
    """One decoder layer's weights (the merged projections of the module docstring).

    The matrices are plain tensors while loading, then what ``ops.prepare_linear``
    returned for them.
    """

    input_norm: torch.Tensor  # [H]
    qkv: Any  # [(Hq + 2 Hk) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D] (Qwen2)
    o: Any  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_up: Any  # [2 I, H]
    down: Any  # [H, I]


class LlamaForCausalLM:
    """A Llama-family decoder over a paged KV cache."""

    # Its attributes and arithmetic are the layout kvrun.models.layout describes.
    decoder_layout: ClassVar[str] = DECODER_LAYOUT

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.ops = ops
        self.attention = attention
        self.dtype = dtype
        self.device = device
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        self.embed: Any = empty(c.vocab_size, c.hidden_size)  # prepared once loaded
        self.layers = [
            LlamaLayer(
                input_norm=empty(c.hidden_size),
                qkv=empty(self.q_size + 2 * self.kv_size, c.hidden_size),
                qkv_bias=empty(self.q_size + 2 * self.kv_size) if c.attention_bias else None,
                o=empty(c.hidden_size, self.q_size),
                post_norm=empty(c.hidden_size),
                gate_up=empty(2 * c.intermediate_size, c.hidden_size),
                down=empty(c.hidden_size, c.intermediate_size),
            )
            for _ in range(c.num_layers)
        ]
        self.norm = empty(c.hidden_size)
        self.lm_head: Any = (
            self.embed if c.tie_word_embeddings else empty(c.vocab_size, c.hidden_size)
        )
        self._prepared = False
        # RoPE is computed in float32 like the reference implementation, whatever the dtype.
        self.cos_sin = cos_sin_cache(
            c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings
        ).to(device)
        # Everything between two attentions; a field so compile() can swap it.
        self._dense: DenseBlock = functools.partial(dense_block, ops, c.rms_norm_eps)

    # loading -------------------------------------------------------------------------
    def _destinations(self) -> dict[str, torch.Tensor]:
        """Hugging Face parameter name -> the slice of our tensor it fills."""
        q, kv, inter = self.q_size, self.kv_size, self.config.intermediate_size
        dest = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            dest["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            dest[p + "input_layernorm.weight"] = layer.input_norm
            dest[p + "post_attention_layernorm.weight"] = layer.post_norm
            dest[p + "self_attn.q_proj.weight"] = layer.qkv[:q]
            dest[p + "self_attn.k_proj.weight"] = layer.qkv[q : q + kv]
            dest[p + "self_attn.v_proj.weight"] = layer.qkv[q + kv :]
            if layer.qkv_bias is not None:
                dest[p + "self_attn.q_proj.bias"] = layer.qkv_bias[:q]
                dest[p + "self_attn.k_proj.bias"] = layer.qkv_bias[q : q + kv]
                dest[p + "self_attn.v_proj.bias"] = layer.qkv_bias[q + kv :]
            dest[p + "self_attn.o_proj.weight"] = layer.o
            dest[p + "mlp.gate_proj.weight"] = layer.gate_up[:inter]
            dest[p + "mlp.up_proj.weight"] = layer.gate_up[inter:]
            dest[p + "mlp.down_proj.weight"] = layer.down
        return dest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Fill every parameter from (Hugging Face name, tensor) pairs, all of which must be
        present, then hand each matrix to the platform's ``prepare_linear``."""
        assert not self._prepared, "weights are loaded once"
        dest = self._destinations()
        missing = set(dest)
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still carry a copy
            target = dest.get(name)
            if target is None:
                raise ModelLoadError(
                    f"{source}: unexpected weight {name!r} for {self.config.architecture}"
                )
            if tuple(tensor.shape) != tuple(target.shape):
                raise ModelLoadError(
                    f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            missing.discard(name)
        if missing:
            shown = ", ".join(sorted(missing)[:5])
            raise ModelLoadError(f"{source}: {len(missing)} weight(s) missing, e.g. {shown}")
        self._prepare()

    def _prepare(self) -> None:
        """Every matrix in the platform's form; the plain tensors are dropped."""
        prepare = self.ops.prepare_linear
        for layer in self.layers:
            layer.qkv = prepare(layer.qkv)
            layer.o = prepare(layer.o)
            layer.gate_up = prepare(layer.gate_up)
            layer.down = prepare(layer.down)
        tied = self.lm_head is self.embed
        self.embed = prepare(self.embed)
        self.lm_head = self.embed if tied else prepare(self.lm_head)
        self._prepared = True

    # forward ---------------------------------------------------------------------------
    def compile(self, compiler: Callable[[DenseBlock, str], DenseBlock]) -> None:
        """Replace the dense block by ``compiler(block, name)`` (torch.compile)."""
        self._dense = compiler(self._dense, f"{self.config.architecture} dense block")

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # one per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] final hidden states (normed)
        c = self.config
        num_tokens = input_ids.shape[0]
        residual = self.ops.embedding(input_ids, self.embed)
        h: torch.Tensor = self.ops.rms_norm(residual, self.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = self.ops.linear(h, layer.qkv, layer.qkv_bias)
            q = qkv[:, : self.q_size].view(num_tokens, c.num_heads, c.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size]
            v = qkv[:, self.q_size + self.kv_size :]
            k = k.view(num_tokens, c.num_kv_heads, c.head_dim)
            v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
            q, k = self.ops.rotary_embedding(positions, q, k, self.cos_sin)
            attn = self.attention.forward(q, k, v, kv_caches[i], meta)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, residual = self._dense(
                attn.reshape(num_tokens, self.q_size),
                residual,
                layer.o,
                layer.post_norm,
                layer.gate_up,
                layer.down,
                next_norm,
            )
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, V] fp32
        logits: torch.Tensor = self.ops.linear(hidden, self.lm_head)
        return logits.float()


def dense_block(
    ops: OpTable,
    eps: float,
    attn: torch.Tensor,  # [T, Hq * D] attention output of layer i
    residual: torch.Tensor,  # [T, H] the residual stream before layer i's attention
    o: torch.Tensor,  # [H, Hq * D]
    post_norm: torch.Tensor,  # [H]
    gate_up: torch.Tensor,  # [2 I, H]
    down: torch.Tensor,  # [H, I]
    next_norm: torch.Tensor,  # [H] layer i+1's input norm, or the final norm
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed input of layer i+1 [T, H], residual [T, H])
    """Layer i's output projection and MLP, and the norm that opens layer i+1."""
    x = ops.linear(attn, o)
    h, residual = ops.fused_add_rms_norm(x, residual, post_norm, eps)
    x = ops.linear(ops.silu_and_mul(ops.linear(h, gate_up)), down)
    return ops.fused_add_rms_norm(x, residual, next_norm, eps)  # type: ignore[no-any-return]
