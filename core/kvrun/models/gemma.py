"""Gemma 2 and Gemma 3 (text) as kvrun code.

Against the Llama arithmetic (:mod:`kvrun.models.llama`), per layer:

- four norms: before attention, on the attention output (before the residual add),
  before the MLP and on the MLP output; every Gemma norm scales by ``1 + w`` (folded
  into the weight once loaded, so the platform's ``rms_norm`` runs them);
- attention scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps the scores
  (``attn_logit_softcapping``); local layers see a sliding window of
  ``sliding_window`` positions (``layer_types``), global layers everything; Gemma 3
  adds per-head q/k norms and rotates its local layers with their own rope theta;
- a GeGLU MLP (``gelu`` with the tanh approximation, as ``gelu_pytorch_tanh``);
- the embedding scaled by ``sqrt(hidden_size)`` (rounded to the model dtype, as
  Hugging Face does), the logits soft-capped by ``final_logit_softcapping`` (Gemma 2).

Tensor/pipeline parallelism (``parallel=``, :mod:`kvrun.distributed`): each rank holds
its heads and MLP rows; the o and down projections' partial sums are all-reduced before
the post-attention and post-feedforward norms (which need the whole vector); the
embedding (scaled after the vocab-parallel lookup is summed) and the lm_head are split
by vocabulary rows, the logits soft-capped once gathered. Each pipeline stage runs its
layers (windows and rope tables as the whole model gives them) and hands the residual
stream on; the first embeds, the last applies the final norm.

Windows need an attention backend that computes them (``"sliding_window" in
attention.features``); with one that does not, the engine serves the model only up to
its shortest window (where global attention is the same) and the local layers attend
globally. Soft-capping has no such fallback: a backend without it refuses the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.errors import ModelLoadError
from kvrun.models.config import ModelConfig
from kvrun.models.rope import cos_sin_cache
from kvrun.models.weights import fill_parameters
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.distributed.layers import ModelParallel
    from kvrun.lora.manager import LoraBatch
    from kvrun.lora.targets import LoraTargets

__all__ = ["GemmaForCausalLM", "GemmaLayer"]


@dataclass
class GemmaLayer:
    """One Gemma layer's weights; matrices as ``prepare_linear`` returned them once loaded."""

    input_norm: torch.Tensor  # [H], 1 + w once loaded
    qkv: Any  # [(Hq + 2 Hk) * D, H]
    o: Any  # [H, Hq * D]
    post_attention_norm: torch.Tensor  # [H]
    pre_feedforward_norm: torch.Tensor  # [H]
    gate_up: Any  # [2 I, H]
    down: Any  # [H, I]
    post_feedforward_norm: torch.Tensor  # [H]
    attention: AttentionBackend  # this layer's (a sliding-window variant for local layers)
    cos_sin: torch.Tensor  # [P, D] this layer's rope table (Gemma 3: local or global)
    q_norm: torch.Tensor | None = None  # [D] (Gemma 3)
    k_norm: torch.Tensor | None = None  # [D]


_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


class GemmaForCausalLM:
    """Gemma2ForCausalLM and Gemma3ForCausalLM (text) over a paged KV cache."""

    # Not kvrun's fused-decoder layout (kvrun.models.layout): decode steps run op by op.
    decoder_layout: ClassVar[str] = "gemma: pre/post norms, GeGLU, soft-capping, windows"
    # LoRA adapters on q/k/v/o and gate/up/down (lora_targets, forward's lora): each
    # projection's adapter is added to its output, before the norm that follows it
    # (o, down) or the GeGLU (gate|up), as PEFT's wrapped Linear modules do.
    supports_lora: ClassVar[bool] = True
    # Tensor/pipeline parallelism: built with ``parallel=``, the model is one rank's shard
    # (``config`` its shape: ShardLayout.rank_config); see the module docstring.
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
        c = config
        if c.hidden_act not in _ACTIVATIONS:
            raise ModelLoadError(
                f"{c.architecture}: hidden activation {c.hidden_act!r} is not supported; "
                f"supported: {', '.join(_ACTIVATIONS)}"
            )
        self.config = config
        self.parallel = parallel
        self.ops = ops
        self.attention = attention
        self.dtype = dtype
        self.device = device
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self._approximate = _ACTIVATIONS[c.hidden_act]

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        positions = c.rope_table_positions
        global_rope = cos_sin_cache(
            c.head_dim, c.rope_theta, c.rope_scaling, positions, c.max_position_embeddings
        ).to(device)
        local_rope = global_rope
        if c.local_rope_theta is not None:
            local_rope = cos_sin_cache(c.head_dim, c.local_rope_theta, None, positions).to(device)
        windows = c.layer_windows or (None,) * c.num_layers
        computes_windows = "sliding_window" in attention.features

        def layer(window: int | None) -> GemmaLayer:
            local = window is not None
            return GemmaLayer(
                input_norm=empty(c.hidden_size),
                qkv=empty(self.q_size + 2 * self.kv_size, c.hidden_size),
                o=empty(c.hidden_size, self.q_size),
                post_attention_norm=empty(c.hidden_size),
                pre_feedforward_norm=empty(c.hidden_size),
                gate_up=empty(2 * c.intermediate_size, c.hidden_size),
                down=empty(c.hidden_size, c.intermediate_size),
                post_feedforward_norm=empty(c.hidden_size),
                attention=(
                    attention.variant(sliding_window=window)
                    if local and computes_windows
                    else attention
                ),
                cos_sin=local_rope if local else global_rope,
                q_norm=empty(c.head_dim) if c.qk_norm else None,
                k_norm=empty(c.head_dim) if c.qk_norm else None,
            )

        # None on a pipeline stage that neither embeds nor uses it as a tied lm_head
        holds_embed = parallel is None or parallel.layout.holds_embedding(c.tie_word_embeddings)
        self.embed: Any = empty(c.vocab_size, c.hidden_size) if holds_embed else None
        self.layers = [layer(w) for w in windows]
        # the final norm and lm_head live on the last pipeline stage only
        self._last_stage = parallel is None or parallel.last_stage
        self.norm = empty(c.hidden_size) if self._last_stage else None
        self.lm_head: Any = (
            self.embed
            if c.tie_word_embeddings or not self._last_stage
            else empty(c.vocab_size, c.hidden_size)
        )
        # sqrt(hidden) rounded to the model dtype, as Hugging Face scales the embedding
        self.embed_scale = torch.tensor(c.hidden_size**0.5, dtype=dtype, device=device)
        self._prepared = False

    # loading -------------------------------------------------------------------------
    def _norms(self) -> list[torch.Tensor]:
        norms = [] if self.norm is None else [self.norm]
        for lay in self.layers:
            norms += [
                lay.input_norm,
                lay.post_attention_norm,
                lay.pre_feedforward_norm,
                lay.post_feedforward_norm,
            ]
            norms += [n for n in (lay.q_norm, lay.k_norm) if n is not None]
        return norms

    def _destinations(self) -> dict[str, torch.Tensor]:
        q, kv, inter = self.q_size, self.kv_size, self.config.intermediate_size
        dest: dict[str, torch.Tensor] = {}
        if self.embed is not None:
            dest["model.embed_tokens.weight"] = self.embed
        if self.norm is not None:
            dest["model.norm.weight"] = self.norm
            if not self.config.tie_word_embeddings:
                dest["lm_head.weight"] = self.lm_head
        for i, lay in enumerate(self.layers):
            p = f"model.layers.{i}."
            dest[p + "input_layernorm.weight"] = lay.input_norm
            dest[p + "post_attention_layernorm.weight"] = lay.post_attention_norm
            dest[p + "pre_feedforward_layernorm.weight"] = lay.pre_feedforward_norm
            dest[p + "post_feedforward_layernorm.weight"] = lay.post_feedforward_norm
            dest[p + "self_attn.q_proj.weight"] = lay.qkv[:q]
            dest[p + "self_attn.k_proj.weight"] = lay.qkv[q : q + kv]
            dest[p + "self_attn.v_proj.weight"] = lay.qkv[q + kv :]
            dest[p + "self_attn.o_proj.weight"] = lay.o
            dest[p + "mlp.gate_proj.weight"] = lay.gate_up[:inter]
            dest[p + "mlp.up_proj.weight"] = lay.gate_up[inter:]
            dest[p + "mlp.down_proj.weight"] = lay.down
            if lay.q_norm is not None and lay.k_norm is not None:
                dest[p + "self_attn.q_norm.weight"] = lay.q_norm
                dest[p + "self_attn.k_norm.weight"] = lay.k_norm
        return dest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Every parameter from (Hugging Face name, tensor) pairs, all of which must be
        present; then the norms become ``1 + w`` and the matrices are prepared."""
        assert not self._prepared, "weights are loaded once"
        fill_parameters(
            self._destinations(),
            weights,
            source=source,
            architecture=self.config.architecture,
            tied=self.config.tie_word_embeddings,
        )
        for norm in self._norms():  # Gemma's norms scale by 1 + w, added in float32
            norm.copy_((norm.float() + 1.0).to(norm.dtype))
        prepare = self.ops.prepare_linear
        for lay in self.layers:
            lay.qkv, lay.o = prepare(lay.qkv), prepare(lay.o)
            lay.gate_up, lay.down = prepare(lay.gate_up), prepare(lay.down)
        tied = self.lm_head is self.embed
        self.embed = prepare(self.embed) if self.embed is not None else None
        self.lm_head = self.embed if tied else prepare(self.lm_head)
        self._prepared = True

    def lora_targets(self) -> LoraTargets:
        """Where PEFT's modules land in the merged projections (kvrun.lora.targets)."""
        from kvrun.lora.targets import LoraTargets, attention_mlp_lora

        c = self.config
        matrices, modules = attention_mlp_lora(
            self.q_size, self.kv_size, c.hidden_size, c.intermediate_size
        )
        return LoraTargets(c.architecture, c.num_layers, matrices, modules)

    # forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,  # the step's adapters, when any token has one
    ) -> torch.Tensor:  # [T, H] final hidden states (normed)
        c, ops = self.config, self.ops
        eps = c.rms_norm_eps
        t = input_ids.shape[0]

        def project(i: int, name: str, x: torch.Tensor, weight: Any) -> torch.Tensor:
            y: torch.Tensor = ops.linear(x, weight)
            return y if lora is None else lora.apply(i, name, x, y)

        par = self.parallel
        partial_sum = None if par is None else par.partial_sum

        def reduce(y: torch.Tensor) -> torch.Tensor:  # row-parallel o and down: summed
            return y if partial_sum is None else partial_sum(y)

        if par is None:
            x = ops.embedding(input_ids, self.embed) * self.embed_scale
        elif par.first_stage:
            x = par.embed(ops, input_ids, self.embed) * self.embed_scale
        else:  # the residual stream the previous stage ended with
            x = par.receive_residual(t, c.hidden_size, self.dtype, self.device)
        for i, lay in enumerate(self.layers):
            h = ops.rms_norm(x, lay.input_norm, eps)
            qkv = project(i, "qkv", h, lay.qkv)
            q = qkv[:, : self.q_size].view(t, c.num_heads, c.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, c.num_kv_heads, c.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(t, c.num_kv_heads, c.head_dim)
            if lay.q_norm is not None and lay.k_norm is not None:
                q = ops.rms_norm(q.reshape(-1, c.head_dim), lay.q_norm, eps).view(q.shape)
                k = ops.rms_norm(k.reshape(-1, c.head_dim), lay.k_norm, eps).view(k.shape)
            q, k = ops.rotary_embedding(positions, q, k, lay.cos_sin)
            attn = lay.attention.forward(q, k, v, kv_caches[i], meta)
            attn = attn.reshape(t, self.q_size)
            o = reduce(project(i, "o", attn, lay.o))
            x = x + ops.rms_norm(o, lay.post_attention_norm, eps)
            h = ops.rms_norm(x, lay.pre_feedforward_norm, eps)
            gate, up = project(i, "gate_up", h, lay.gate_up).chunk(2, dim=-1)
            inner = F.gelu(gate, approximate=self._approximate) * up
            mlp = reduce(project(i, "down", inner, lay.down))
            x = x + ops.rms_norm(mlp, lay.post_feedforward_norm, eps)
        if par is not None and not par.last_stage:
            par.send_residual(x)
            # the next stage's input; this stage computes no logits
            return x  # type: ignore[no-any-return]
        return ops.rms_norm(x, self.norm, eps)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, V] fp32
        logits: torch.Tensor = self.ops.linear(hidden, self.lm_head)
        if self.parallel is not None:  # each rank's vocabulary columns, joined on tp_rank 0
            logits = self.parallel.gather_logits(logits)
        logits = logits.float()
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
