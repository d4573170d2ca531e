"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM2) as kvrun code.

Qwen3 adds a per-head RMSNorm of q and k before the rotation; Phi-3 stores q|k|v and
gate|up already merged. Both are this class's arithmetic otherwise. Mixtral and
Qwen2/3-MoE replace the MLP of some or all layers by a mixture of experts
(:mod:`kvrun.models.moe`): :class:`MixtureOfExpertsForCausalLM`.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.models.config import ModelConfig
from kvrun.models.layout import DECODER_LAYOUT
from kvrun.models.moe import (
    MoeWeights,
    empty_mixture,
    lora_moe_mlp,
    mixture_destinations,
    moe_block,
    prepare_mixture,
)
from kvrun.models.rope import cos_sin_cache
from kvrun.models.weights import fill_parameters
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.distributed.layers import ModelParallel
    from kvrun.lora.manager import LoraBatch
    from kvrun.lora.targets import LoraTargets

__all__ = [
    "EVERY_LAYER_WINDOWED",
    "LlamaForCausalLM",
    "LlamaLayer",
    "MixtureOfExpertsForCausalLM",
    "Qwen3ForCausalLM",
    "dense_block",
    "every_layer_window",
    "lora_dense_block",
    "lora_moe_block",
]

DenseBlock = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# Architectures whose config's sliding_window windows every layer, as Hugging Face's
# attention does (Mistral v0.1, Mixtral). The others are served up to their window, with
# global attention: Qwen's opt-in window (use_sliding_window) covers only the layers from
# max_window_layers on; Phi-3's (2047 of mini-4k's 4096) keeps the fast global kernels.
EVERY_LAYER_WINDOWED = frozenset({"MistralForCausalLM", "MixtralForCausalLM"})


def every_layer_window(config: ModelConfig) -> int | None:
    """The sliding window every attention layer of this Llama-family model sees (a query
    at p sees keys > p - W), or None when it attends globally."""
    if config.architecture in EVERY_LAYER_WINDOWED:
        return config.sliding_window
    return None


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
    q_norm: torch.Tensor | None = None  # [D] per-head norm of q (Qwen3)
    k_norm: torch.Tensor | None = None  # [D] per-head norm of k (Qwen3)
    moe: MoeWeights | None = None  # the mixture that replaces gate_up/down (then None)


class LlamaForCausalLM:
    """A Llama-family decoder over a paged KV cache."""

    # Its attributes and arithmetic are the layout kvrun.models.layout describes.
    decoder_layout: ClassVar[str] = DECODER_LAYOUT
    # LoRA adapters on the attention and MLP projections (lora_targets, forward's lora)
    supports_lora: ClassVar[bool] = True
    # Tensor/pipeline parallelism (kvrun.distributed): built with ``parallel=``, the model
    # is one rank's shard (``config`` is then the rank's shape, ShardLayout.rank_config).
    supports_parallel: ClassVar[bool] = True

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        parallel: ModelParallel | None = None,
    ) -> None:
        self.config = config
        self.parallel = parallel
        self.ops = ops
        # Mistral-style windows, where the backend computes them; elsewhere the engine
        # serves the model only up to its window (kvrun.engine.builder), where global
        # attention is the same.
        window = every_layer_window(config)
        if window is not None and "sliding_window" in attention.features:
            attention = attention.variant(sliding_window=window)
        self.attention = attention
        self.dtype = dtype
        self.device = device
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        # prepared once loaded; None on a pipeline stage that neither embeds nor uses it
        # as a tied lm_head
        holds_embed = parallel is None or parallel.layout.holds_embedding(c.tie_word_embeddings)
        self.embed: Any = empty(c.vocab_size, c.hidden_size) if holds_embed else None

        def layer(i: int) -> LlamaLayer:
            moe = c.moe_layers[i] if c.moe_layers else False
            return LlamaLayer(
                input_norm=empty(c.hidden_size),
                qkv=empty(self.q_size + 2 * self.kv_size, c.hidden_size),
                qkv_bias=empty(self.q_size + 2 * self.kv_size) if c.attention_bias else None,
                o=empty(c.hidden_size, self.q_size),
                post_norm=empty(c.hidden_size),
                gate_up=None if moe else empty(2 * c.intermediate_size, c.hidden_size),
                down=None if moe else empty(c.hidden_size, c.intermediate_size),
                q_norm=empty(c.head_dim) if c.qk_norm else None,
                k_norm=empty(c.head_dim) if c.qk_norm else None,
                moe=empty_mixture(c, empty, gated_shared=True) if moe else None,
            )

        self.layers = [layer(i) for i in range(c.num_layers)]
        # the final norm and lm_head live on the last pipeline stage only
        self._last_stage = parallel is None or parallel.last_stage
        self.norm = (
            empty(c.hidden_size)
            if self._last_stage
            else torch.ones(c.hidden_size, dtype=dtype, device=device)
        )
        self.lm_head: Any = (
            self.embed
            if c.tie_word_embeddings or not self._last_stage
            else empty(c.vocab_size, c.hidden_size)
        )
        self._prepared = False
        # RoPE is computed in float32 like the reference implementation, whatever the dtype.
        self.cos_sin = cos_sin_cache(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling,
            c.rope_table_positions,
            c.max_position_embeddings,
        ).to(device)
        # Everything between two attentions; a field so compile() can swap it.
        self._dense: DenseBlock = functools.partial(dense_block, ops, c.rms_norm_eps)
        if parallel is not None and parallel.tensor_parallel:  # row-parallel o and down
            self._dense = functools.partial(self._dense, all_reduce=parallel.all_reduce)

    # loading -------------------------------------------------------------------------
    def _destinations(self) -> dict[str, torch.Tensor]:
        """Hugging Face parameter name -> the slice of our tensor it fills."""
        q, kv, inter = self.q_size, self.kv_size, self.config.intermediate_size
        dest = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if self.embed is None:  # a pipeline stage without it (see __init__)
            del dest["model.embed_tokens.weight"]
        if not self._last_stage:
            del dest["model.norm.weight"]
        elif not self.config.tie_word_embeddings:
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
            if layer.moe is not None:
                dest.update(_mixture_destinations(p, layer.moe, self.config))
            else:
                dest[p + "mlp.gate_proj.weight"] = layer.gate_up[:inter]
                dest[p + "mlp.up_proj.weight"] = layer.gate_up[inter:]
                dest[p + "mlp.down_proj.weight"] = layer.down
                dest[p + "mlp.gate_up_proj.weight"] = layer.gate_up  # Phi-3's merged form
            if layer.q_norm is not None and layer.k_norm is not None:
                dest[p + "self_attn.q_norm.weight"] = layer.q_norm
                dest[p + "self_attn.k_norm.weight"] = layer.k_norm
            dest[p + "self_attn.qkv_proj.weight"] = layer.qkv  # Phi-3's merged form
        return dest

    @staticmethod
    def _merged_alias(name: str) -> tuple[str, ...]:
        """The names a merged (Phi-3) weight fills, to tick them off as loaded."""
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            return tuple(f"{stem}{x}_proj.weight" for x in "qkv")
        if name.endswith("mlp.gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            return (f"{stem}gate_proj.weight", f"{stem}up_proj.weight")
        return ()

    def keep_quantized(
        self, stored_types: Mapping[str, str], accepted: Iterable[str]
    ) -> frozenset[str]:
        """Before :meth:`load_weights` (``quantization="gguf"``): the matrices stored in
        an ``accepted`` GGUF type become quantized destinations; returns the Hugging Face
        names the loader must yield quantized (:func:`kvrun.quantization.keep_llama_quantized`)."""
        from kvrun.quantization import keep_llama_quantized

        return keep_llama_quantized(self, stored_types, accepted)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Fill every parameter from (Hugging Face name, tensor) pairs, all of which must be
        present, then hand each matrix to the platform's ``prepare_linear``."""
        assert not self._prepared, "weights are loaded once"
        fill_parameters(
            self._destinations(),
            weights,
            source=source,
            architecture=self.config.architecture,
            tied=self.config.tie_word_embeddings,
            also_fills=self._merged_alias,
        )
        self._prepare()

    def _prepare(self) -> None:
        """Every matrix in the platform's form; the plain tensors are dropped."""
        prepare = self.ops.prepare_linear
        for layer in self.layers:
            layer.qkv = prepare(layer.qkv)
            layer.o = prepare(layer.o)
            if layer.moe is None:
                layer.gate_up = prepare(layer.gate_up)
                layer.down = prepare(layer.down)
                continue
            prepare_mixture(layer.moe, self.ops)
        tied = self.lm_head is self.embed
        self.embed = prepare(self.embed) if self.embed is not None else None
        self.lm_head = self.embed if tied else prepare(self.lm_head)
        self._prepared = True

    def lora_targets(self) -> LoraTargets:
        """Where PEFT's modules land in the merged projections (kvrun.lora.targets)."""
        from kvrun.lora.targets import LoraTargets, attention_mlp_lora

        c = self.config
        matrices, modules = attention_mlp_lora(
            self.q_size, self.kv_size, c.hidden_size, c.intermediate_size, merged_names=True
        )
        return LoraTargets(c.architecture, c.num_layers, matrices, modules)

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
        lora: LoraBatch | None = None,  # the step's adapters, when any token has one
        inputs_embeds: torch.Tensor | None = None,  # [T, H] used instead of input_ids' rows
    ) -> torch.Tensor:  # [T, H] final hidden states (normed)
        c = self.config
        num_tokens = input_ids.shape[0]
        if inputs_embeds is not None:  # a multimodal model's media rows (kvrun.models.qwen2_vl)
            residual = inputs_embeds
        elif self.parallel is None:
            residual = self.ops.embedding(input_ids, self.embed)
        elif self.parallel.first_stage:
            residual = self.parallel.embed(self.ops, input_ids, self.embed)
        else:  # a later pipeline stage starts from the residual stream of the one before
            residual = self.parallel.receive_residual(
                num_tokens, c.hidden_size, self.dtype, self.device
            )
        h: torch.Tensor = self.ops.rms_norm(residual, self.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = self.ops.linear(h, layer.qkv, layer.qkv_bias)
            if lora is not None:
                qkv = lora.apply(i, "qkv", h, qkv)
            q = qkv[:, : self.q_size].view(num_tokens, c.num_heads, c.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size]
            v = qkv[:, self.q_size + self.kv_size :]
            k = k.view(num_tokens, c.num_kv_heads, c.head_dim)
            v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = self._head_norm(q, layer.q_norm)
                k = self._head_norm(k, layer.k_norm)
            q, k = self._rotate(positions, q, k)
            attn = self.attention.forward(q, k, v, kv_caches[i], meta)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            if layer.moe is not None and lora is not None:
                h, residual = lora_moe_block(
                    self.ops,
                    c,
                    lora,
                    i,
                    attn.reshape(num_tokens, self.q_size),
                    residual,
                    layer,
                    next_norm,
                    all_reduce=None if self.parallel is None else self.parallel.partial_sum,
                )
                continue
            if layer.moe is not None:
                h, residual = moe_block(
                    self.ops,
                    c,
                    attn.reshape(num_tokens, self.q_size),
                    residual,
                    layer.o,
                    layer.post_norm,
                    layer.moe,
                    next_norm,
                    all_reduce=None if self.parallel is None else self.parallel.partial_sum,
                )
                continue
            if lora is not None:
                h, residual = lora_dense_block(
                    self.ops,
                    c.rms_norm_eps,
                    lora,
                    i,
                    attn.reshape(num_tokens, self.q_size),
                    residual,
                    layer,
                    next_norm,
                    all_reduce=None if self.parallel is None else self.parallel.partial_sum,
                )
                continue
            h, residual = self._dense(
                attn.reshape(num_tokens, self.q_size),
                residual,
                layer.o,
                layer.post_norm,
                layer.gate_up,
                layer.down,
                next_norm,
            )
        if not self._last_stage:
            assert self.parallel is not None
            self.parallel.send_residual(residual)
            return residual  # the next stage's input; this stage computes no logits
        return h

    def _rotate(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q and k (a subclass with other positions overrides it)."""
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin)  # type: ignore[no-any-return]

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each head's vector ([T, heads, D]), Qwen3's q/k norm."""
        rows = x.reshape(-1, x.shape[-1])
        normed: torch.Tensor = self.ops.rms_norm(rows, weight, self.config.rms_norm_eps)
        return normed.view(x.shape)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, V] fp32
        logits: torch.Tensor = self.ops.linear(hidden, self.lm_head)
        if self.parallel is not None:  # each rank's vocabulary columns, joined on tp_rank 0
            logits = self.parallel.gather_logits(logits)
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
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed input of layer i+1 [T, H], residual [T, H])
    """Layer i's output projection and MLP, and the norm that opens layer i+1.

    ``all_reduce``: tensor parallelism's sum of the row-parallel o and down projections'
    partial results over the ranks (kvrun.distributed); None for a whole model."""
    x = ops.linear(attn, o)
    if all_reduce is not None:
        x = all_reduce(x)
    h, residual = ops.fused_add_rms_norm(x, residual, post_norm, eps)
    x = ops.linear(ops.silu_and_mul(ops.linear(h, gate_up)), down)
    if all_reduce is not None:
        x = all_reduce(x)
    return ops.fused_add_rms_norm(x, residual, next_norm, eps)  # type: ignore[no-any-return]


def lora_dense_block(
    ops: OpTable,
    eps: float,
    lora: LoraBatch,
    index: int,  # the layer's index
    attn: torch.Tensor,  # [T, Hq * D] attention output of layer i
    residual: torch.Tensor,  # [T, H]
    layer: LlamaLayer,
    next_norm: torch.Tensor,  # [H]
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # as dense_block
    """dense_block with each token's LoRA adapter added to o, gate|up and down. Under
    tensor parallelism (``all_reduce``) a rank's row-parallel delta (its columns of A,
    kvrun.lora.sharding) is part of its partial sum: added before the all-reduce."""
    x = lora.apply(index, "o", attn, ops.linear(attn, layer.o))
    if all_reduce is not None:
        x = all_reduce(x)
    h, residual = ops.fused_add_rms_norm(x, residual, layer.post_norm, eps)
    gate_up = lora.apply(index, "gate_up", h, ops.linear(h, layer.gate_up))
    inner = ops.silu_and_mul(gate_up)
    x = lora.apply(index, "down", inner, ops.linear(inner, layer.down))
    if all_reduce is not None:
        x = all_reduce(x)
    return ops.fused_add_rms_norm(x, residual, next_norm, eps)  # type: ignore[no-any-return]


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: the Llama arithmetic with a per-head RMSNorm of q and k before the rotation
    (part of kvrun's fused-decoder layout since its version 2)."""


class MixtureOfExpertsForCausalLM(LlamaForCausalLM):
    """Mixtral, Qwen2-MoE (with its shared expert) and Qwen3-MoE (with Qwen3's q/k
    norms): the Llama arithmetic with mixture-of-experts MLPs (:mod:`kvrun.models.moe`),
    in every layer or those the config names. The mixtures are outside kvrun's
    fused-decoder layout, so decode steps run op by op (the reason is logged).
    """

    decoder_layout: ClassVar[str] = f"{DECODER_LAYOUT} + mixture-of-experts MLPs"
    # LoRA on attention, dense MLPs, the shared expert and the routed experts
    # (lora_targets; the mixture: lora_moe_block)
    supports_lora: ClassVar[bool] = True
    # each expert split by its intermediate dimension, routing replicated (kvrun.models.moe)
    supports_parallel: ClassVar[bool] = True

    def lora_targets(self) -> LoraTargets:
        """The Llama layout's matrices where a layer has a dense MLP; in mixture layers,
        Qwen2-MoE's shared expert (``shared_expert.gate_proj``...) and the routed
        experts through PEFT's ``target_parameters`` (``experts.gate_up_proj``,
        ``experts.down_proj``: one A and B per expert)."""
        from kvrun.lora.targets import LoraMatrix, LoraTarget, LoraTargets, attention_mlp_lora

        c = self.config
        hidden, inter = c.hidden_size, c.moe_intermediate_size
        shared = c.shared_expert_intermediate_size
        mixtures = frozenset(i for i, layer in enumerate(self.layers) if layer.moe is not None)
        matrices, modules = attention_mlp_lora(
            self.q_size,
            self.kv_size,
            hidden,
            c.intermediate_size,
            mlp_layers=frozenset(range(c.num_layers)) - mixtures,
        )
        extra = [
            LoraMatrix("experts_w13", hidden, 2 * inter, 2, mixtures, experts=c.num_experts),
            LoraMatrix("experts_w2", inter, hidden, 1, mixtures, experts=c.num_experts),
        ]
        parameters = ("experts.gate_up_proj", "experts.down_proj")  # PEFT's nesting order
        modules["experts.gate_up_proj"] = LoraTarget("experts_w13", 0, (0, 2 * inter))
        modules["experts.down_proj"] = LoraTarget("experts_w2", 0, (0, hidden))
        # transformers 4's expert modules (kvrun.lora.targets)
        v4 = ("w1", "w3", "w2") if c.architecture == "MixtralForCausalLM" else None
        gate, up, down = v4 or ("gate_proj", "up_proj", "down_proj")
        modules[f"experts.{gate}"] = LoraTarget("experts_w13", 0, (0, inter))
        modules[f"experts.{up}"] = LoraTarget("experts_w13", 1, (inter, 2 * inter))
        modules[f"experts.{down}"] = LoraTarget("experts_w2", 0, (0, hidden))
        if shared:
            extra += [
                LoraMatrix("shared_gate_up", hidden, 2 * shared, 2, mixtures),
                LoraMatrix("shared_down", shared, hidden, 1, mixtures),
            ]
            modules["shared_expert.gate_proj"] = LoraTarget("shared_gate_up", 0, (0, shared))
            modules["shared_expert.up_proj"] = LoraTarget("shared_gate_up", 1, (shared, 2 * shared))
            modules["shared_expert.down_proj"] = LoraTarget("shared_down", 0, (0, hidden))
        return LoraTargets(
            c.architecture, c.num_layers, (*matrices, *extra), modules, parameters=parameters
        )


def lora_moe_block(
    ops: OpTable,
    config: ModelConfig,
    lora: LoraBatch,
    index: int,  # the layer's index
    attn: torch.Tensor,  # [T, Hq * D] attention output of layer i
    residual: torch.Tensor,  # [T, H]
    layer: LlamaLayer,
    next_norm: torch.Tensor,  # [H]
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # as moe_block
    """moe_block with each token's LoRA adapter added to o and inside the mixture
    (:func:`kvrun.models.moe.lora_moe_mlp`). Under tensor parallelism (``all_reduce``)
    the o delta and the mixture's (its experts' and shared expert's deltas included, each
    on the rank's share of the intermediate dimension, kvrun.lora.sharding) are parts of
    the rank's partial sums: added before the all-reduce."""
    assert layer.moe is not None
    eps = config.rms_norm_eps
    x = lora.apply(index, "o", attn, ops.linear(attn, layer.o))
    if all_reduce is not None:
        x = all_reduce(x)
    h, residual = ops.fused_add_rms_norm(x, residual, layer.post_norm, eps)
    x = lora_moe_mlp(ops, h, layer.moe, config, lora, index)
    if all_reduce is not None:
        x = all_reduce(x)
    return ops.fused_add_rms_norm(x, residual, next_norm, eps)  # type: ignore[no-any-return]


def _mixture_destinations(prefix: str, moe: MoeWeights, config: ModelConfig) -> dict[str, Any]:
    """One mixture layer's Hugging Face names: Mixtral's experts are w1 (gate), w3 (up)
    and w2 (down) under block_sparse_moe; Qwen's gate/up/down_proj under mlp."""
    if config.architecture == "MixtralForCausalLM":
        names = ("w1", "w3", "w2")
        return mixture_destinations(prefix + "block_sparse_moe.", moe, config, expert_names=names)
    return mixture_destinations(prefix + "mlp.", moe, config)


class LlamaForSequenceClassification(LlamaForCausalLM):
    """A Llama-family classifier (Llama, Mistral, Qwen2, Qwen3 ``*ForSequenceClassification``):
    the decoder, then a ``score`` head of one row per label in place of the lm_head.

    It runs under the pooling runner only: :meth:`compute_logits` gives the class logits
    of each row, which the runner returns for the pooled positions
    (``pools_class_logits``); a linear head without bias commutes with the pooling.
    """

    decoder_layout: ClassVar[str] = "kvrun-sequence-classifier (pooling only)"
    pools_class_logits: ClassVar[bool] = True
    supports_lora: ClassVar[bool] = True  # the decoder's; the score head takes no adapter
    supports_parallel: ClassVar[bool] = False  # the score head is not vocab-sharded

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(replace(config, tie_word_embeddings=False), ops, attention, dtype, device)
        self.lm_head = torch.empty(
            len(config.id2label), config.hidden_size, dtype=dtype, device=device
        )

    def _destinations(self) -> dict[str, torch.Tensor]:
        dest = super()._destinations()
        dest["score.weight"] = dest.pop("lm_head.weight")
        return dest
