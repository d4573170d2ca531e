"""DeepSeek-V2 and V3 (multi-head latent attention and routed experts) as kvrun code.

Attention per layer: q from ``q_proj`` (or ``q_a_proj`` -> norm -> ``q_b_proj``), each
head [q_nope | q_pe]; ``kv_a_proj_with_mqa`` gives the latent c (normed,
``kv_lora_rank`` wide) and one shared rope key k_pe; ``kv_b_proj`` expands c into each
head's k_nope (W_UK) and value (W_UV). Scores are q_nope . k_nope + q_pe . k_pe, scaled
by qk_head_dim ** -0.5 (times yarn's mscale squared).

The cache holds the latent, not the heads ("absorbed", the default): since
q_nope . (W_UK c) = (q_nope W_UK) . c, attention is multi-query over one kv head of
width kv_lora_rank + rope, key = value = [c | k_pe], with each query head
[q_nope W_UK | q_pe]; the first kv_lora_rank columns of its output are sum(p c), which
W_UV and o_proj turn into the layer's output. A backend that computes "latent_kv"
(``AttentionLayerSpec.latent_value_dim``, set by the engine builder) caches one plane
of kv_lora_rank + rope values per token and reads the value as its first kv_lora_rank
columns; any other runs it as plain multi-query attention over two planes holding the
same [c | k_pe] (the key passed again as the value; the builder logs why): the same
output either way. With VLLM_MLA_PERFORM_MATRIX_ABSORPTION (the default) the products
W_q W_UK and W_o W_UV are computed once at load (fused matrices); without it they are
applied one after the other in each step. VLLM_MLA_DISABLE=1 caches every head's key
and value (values zero-padded to the key's width, 2 x Hh x qk values per token) and
runs plain multi-head attention.

transformers rotates q_pe and k_pe in interleaved pairs (2i, 2i+1); kvrun's rotary
pairs (i, i + d/2). The rows of both rope projections are permuted at load (evens, then
odds), which turns one into the other and leaves every q_pe . k_pe unchanged (a V3
config with ``rope_interleave: false`` rotates halves already: no permutation).

DeepSeek-V3 differs from V2 only in config and one router buffer: sigmoid scores with
``e_score_correction_bias`` (:func:`kvrun.models.moe.route`). Its checkpoints carry
multi-token-prediction layers (``model.layers.{num_hidden_layers + k}``) for speculative
decoding; kvrun does not speculate with them, so their weights are skipped at load
with a log line, as vLLM skips them when not speculating.

Tensor parallelism (``parallel=``, :mod:`kvrun.distributed`) splits the attention by
heads, as vLLM does: each rank holds its heads' rows of q (or q_b) and kv_b and their
columns of o, and the latent path (q_a, kv_a, their norms) whole, so every rank caches the
whole latent of each token; the absorbed matrices are its heads' products. The o
projection's and the MLP's (or mixture's, shared experts included) partial sums are
all-reduced. Pipeline stages split the layers (the dense-first layers wherever they
fall); the first embeds, the last applies the final norm and the lm_head.

fp8 checkpoints are dequantized at load (:mod:`kvrun.loader.fp8`); the absorbed
matrices are then rounded back onto the fp8 block grid, as vLLM requantizes them,
unless VLLM_MLA_DISABLE_REQUANTIZATION=1 (``ModelConfig.mla_requantize``).

LoRA adapters (:meth:`DeepseekV2ForCausalLM.lora_targets`) change q, kv_a, o, the
dense MLPs and, with every head cached, kv_b. Their q and kv_a deltas are computed in
transformers' row order and then rearranged like the weights (rope columns, W_UK
absorbed per step); o_proj's reads the values that the fused o matrix skips. Under
tensor parallelism each rank holds the adapters' share of its heads (q/q_b and kv_b: B's
rows; o: A's columns, its delta added before the all-reduce) and q_a's and kv_a's whole
(kvrun.lora.sharding).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.errors import ModelLoadError
from kvrun.loader.fp8 import round_to_fp8_blocks
from kvrun.models.config import ModelConfig
from kvrun.models.moe import (
    MoeWeights,
    empty_mixture,
    lora_moe_mlp,
    mixture_destinations,
    moe_mlp,
    prepare_mixture,
)
from kvrun.models.rope import cos_sin_cache
from kvrun.models.weights import fill_parameters
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.distributed.layers import ModelParallel
    from kvrun.lora.manager import LoraBatch
    from kvrun.lora.targets import LoraTargets

__all__ = ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"]

logger = logging.getLogger(__name__)
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")

_LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV2RMSNorm default for the q/kv latents


@dataclass
class MlaLayer:
    """One layer's weights; matrices as ``prepare_linear`` returned them once loaded,
    except ``kv_b``, the up-projection, kept plain for the per-head products."""

    input_norm: torch.Tensor  # [H]
    q: Any  # [Hh * qk, H] or, with q_lora_rank, [Hh * qk, q_lora]
    q_a: Any | None  # [q_lora, H]
    q_a_norm: torch.Tensor | None  # [q_lora]
    kv_a: Any  # [kv_lora + rope, H]
    kv_a_norm: torch.Tensor  # [kv_lora]
    kv_b: torch.Tensor  # [Hh * (nope + v), kv_lora]
    o: Any  # [H, Hh * v]
    post_norm: torch.Tensor  # [H]
    gate_up: Any | None = None  # dense MLP (the first_k_dense_replace layers)
    down: Any | None = None
    moe: MoeWeights | None = None
    # absorbed and fused at load: q_nope . W_UK, and o . W_UV, per head
    q_latent: Any | None = None  # [Hh * kv_lora, q input]
    q_rope: Any | None = None  # [Hh * rope, q input]
    o_latent: Any | None = None  # [H, Hh * kv_lora]


class DeepseekV2ForCausalLM:
    """DeepseekV2ForCausalLM over a paged cache of latents (or of heads, MLA disabled)."""

    # Not kvrun's fused-decoder layout (kvrun.models.layout): decode steps run op by op.
    decoder_layout: ClassVar[str] = "deepseek-v2: latent attention, routed experts"
    # LoRA on the attention projections and dense MLPs (lora_targets, forward's lora)
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
        self.parallel = parallel
        if not c.is_mla:
            raise ModelLoadError(f"{c.architecture}: the config has no kv_lora_rank")
        self.config, self.ops, self.attention = config, ops, attention
        self.dtype, self.device = dtype, device
        self.heads = c.num_heads
        self.qk = c.qk_nope_head_dim + c.qk_rope_head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        q_in = c.q_lora_rank or c.hidden_size

        def mixture() -> MoeWeights:
            moe = empty_mixture(c, empty, gated_shared=False)
            if c.topk_method == "noaux_tc":  # kept in float32, as transformers keeps it
                moe.correction_bias = torch.empty(c.num_experts, device=device)
            return moe

        def layer(i: int) -> MlaLayer:
            moe = bool(c.moe_layers and c.moe_layers[i])
            return MlaLayer(
                input_norm=empty(c.hidden_size),
                q=empty(self.heads * self.qk, q_in),
                q_a=empty(c.q_lora_rank, c.hidden_size) if c.q_lora_rank else None,
                q_a_norm=empty(c.q_lora_rank) if c.q_lora_rank else None,
                kv_a=empty(c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
                kv_a_norm=empty(c.kv_lora_rank),
                kv_b=empty(self.heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                o=empty(c.hidden_size, self.heads * c.v_head_dim),
                post_norm=empty(c.hidden_size),
                gate_up=None if moe else empty(2 * c.intermediate_size, c.hidden_size),
                down=None if moe else empty(c.hidden_size, c.intermediate_size),
                moe=mixture() if moe else None,
            )

        # None on a pipeline stage that neither embeds nor uses it as a tied lm_head
        holds_embed = parallel is None or parallel.layout.holds_embedding(c.tie_word_embeddings)
        self.embed: Any = empty(c.vocab_size, c.hidden_size) if holds_embed else None
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
        self.cos_sin = cos_sin_cache(
            c.qk_rope_head_dim,
            c.rope_theta,
            c.rope_scaling,
            c.rope_table_positions,
            c.max_position_embeddings,
        ).to(device)
        self._prepared = False

    # loading -------------------------------------------------------------------------
    def _destinations(self) -> dict[str, torch.Tensor]:
        c = self.config
        dest: dict[str, Any] = {}
        if self.embed is not None:
            dest["model.embed_tokens.weight"] = self.embed
        if self._last_stage:
            dest["model.norm.weight"] = self.norm
            if not c.tie_word_embeddings:
                dest["lm_head.weight"] = self.lm_head
        for i, lay in enumerate(self.layers):
            p = f"model.layers.{i}."
            dest[p + "input_layernorm.weight"] = lay.input_norm
            dest[p + "post_attention_layernorm.weight"] = lay.post_norm
            a = p + "self_attn."
            if lay.q_a is not None and lay.q_a_norm is not None:
                dest[a + "q_a_proj.weight"] = lay.q_a
                dest[a + "q_a_layernorm.weight"] = lay.q_a_norm
                dest[a + "q_b_proj.weight"] = lay.q
            else:
                dest[a + "q_proj.weight"] = lay.q
            dest[a + "kv_a_proj_with_mqa.weight"] = lay.kv_a
            dest[a + "kv_a_layernorm.weight"] = lay.kv_a_norm
            dest[a + "kv_b_proj.weight"] = lay.kv_b
            dest[a + "o_proj.weight"] = lay.o
            if lay.moe is None:
                inter, gate_up = c.intermediate_size, lay.gate_up
                assert isinstance(gate_up, torch.Tensor)
                dest[p + "mlp.gate_proj.weight"] = gate_up[:inter]
                dest[p + "mlp.up_proj.weight"] = gate_up[inter:]
                dest[p + "mlp.down_proj.weight"] = lay.down
                continue
            dest.update(
                mixture_destinations(p + "mlp.", lay.moe, c, shared_module="shared_experts")
            )
            if lay.moe.correction_bias is not None:
                dest[p + "mlp.gate.e_score_correction_bias"] = lay.moe.correction_bias
        return dest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        assert not self._prepared, "weights are loaded once"
        fill_parameters(
            self._destinations(),
            self._without_mtp_layers(weights, source),
            source=source,
            architecture=self.config.architecture,
            tied=self.config.tie_word_embeddings,
        )
        self._prepare()

    def _without_mtp_layers(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The weights minus DeepSeek-V3's multi-token-prediction layers (numbered from
        num_hidden_layers on), logged once with how many were skipped."""
        skipped: set[int] = set()
        count = 0
        for name, tensor in weights:
            match = _LAYER_NAME.match(name)
            if match is not None and int(match.group(1)) >= self.config.num_layers:
                skipped.add(int(match.group(1)))
                count += 1
                continue
            yield name, tensor
        if skipped:
            logger.info(
                "%s: skipped %d weights of multi-token-prediction layer(s) %s: kvrun does "
                "not run speculative decoding with them",
                source,
                count,
                ", ".join(str(i) for i in sorted(skipped)),
            )

    def _rope_rows(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """The rope part's rows of ``count`` heads reordered (evens, then odds): see the
        module docstring; unchanged where the checkpoint rotates halves already.
        ``rows``: [count * rope, ...]."""
        if not self.config.mla_rope_interleaved:
            return rows
        rope = self.config.qk_rope_head_dim
        order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
        return rows.view(count, rope, -1)[:, order].reshape(rows.shape)

    def _prepare(self) -> None:
        c, prepare = self.config, self.ops.prepare_linear
        nope, rope, v, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        absorbed = c.mla_mode == "absorbed" and c.mla_fused
        requantize = absorbed and c.fp8_weight_block is not None and c.mla_requantize
        if absorbed and c.fp8_weight_block is not None:
            rows, cols = c.fp8_weight_block
            logger.info(
                "fp8 weights, MLA matrices absorbed at load: %s",
                f"rounded back onto the fp8 {rows}x{cols} block grid (requantized, as vLLM does)"
                if requantize
                else "kept at full precision (VLLM_MLA_DISABLE_REQUANTIZATION=1)",
            )

        def absorbed_matrix(fused: torch.Tensor) -> Any:  # float32 [out, in]
            if requantize:
                assert c.fp8_weight_block is not None
                fused = round_to_fp8_blocks(fused, c.fp8_weight_block)
            return prepare(fused.to(self.dtype))

        for lay in self.layers:
            q = lay.q.view(self.heads, self.qk, -1)  # [Hh, qk, in]
            q_rope = self._rope_rows(q[:, nope:].reshape(self.heads * rope, -1), self.heads)
            q_nope = q[:, :nope]  # [Hh, nope, in]
            kv_a = lay.kv_a.clone()
            kv_a[lat:] = self._rope_rows(kv_a[lat:], 1)
            lay.kv_a = prepare(kv_a)
            if lay.q_a is not None:
                lay.q_a = prepare(lay.q_a)
            kv_b = lay.kv_b.view(self.heads, nope + v, lat)
            w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]  # [Hh, nope, lat], [Hh, v, lat]
            if absorbed:
                # q_lat[h] = x @ (W_UK[h]^T @ W_q_nope[h])^T; out = sum_h o_lat[h] @ (W_o[:, h] @ W_UV[h])^T
                fused_q = torch.einsum("hnc,hni->hci", w_uk.float(), q_nope.float())
                lay.q_latent = absorbed_matrix(fused_q.reshape(self.heads * lat, -1))
                o = lay.o.view(-1, self.heads, v).float()  # [H, Hh, v]
                fused_o = torch.einsum("ohv,hvc->ohc", o, w_uv.float())
                lay.o_latent = absorbed_matrix(fused_o.reshape(o.shape[0], -1))
                lay.q_rope = prepare(q_rope.contiguous())
                lay.q = lay.o = None
            else:
                merged = torch.cat((q_nope.reshape(self.heads * nope, -1), q_rope))
                lay.q = prepare(merged.contiguous())  # [Hh * nope | Hh * rope, in]
                lay.o = prepare(lay.o)
            if lay.moe is None:
                lay.gate_up, lay.down = prepare(lay.gate_up), prepare(lay.down)
            else:
                prepare_mixture(lay.moe, self.ops)
        tied = self.lm_head is self.embed
        self.embed = prepare(self.embed) if self.embed is not None else None
        self.lm_head = self.embed if tied else prepare(self.lm_head)
        self._prepared = True

    def lora_targets(self) -> LoraTargets:
        """PEFT's modules kvrun adapts: ``q_proj`` (or ``q_a_proj`` and ``q_b_proj``),
        ``kv_a_proj_with_mqa``, ``o_proj`` and the dense layers' ``gate_proj``,
        ``up_proj``, ``down_proj``; ``kv_b_proj`` only with VLLM_MLA_DISABLE=1 (absorbed,
        its halves are folded into q and o or applied per head, and an adapter on it is
        refused as a module this model does not adapt). In the mixture layers, the shared
        experts (``shared_experts.gate_proj``...) and the routed experts through PEFT's
        ``target_parameters`` (``experts.gate_up_proj``, ``experts.down_proj``: one A and
        B per expert), run by :func:`kvrun.models.moe.lora_moe_mlp`."""
        from kvrun.lora.targets import LoraMatrix, LoraTarget, LoraTargets

        c = self.config
        hidden, lat, rope, heads = c.hidden_size, c.kv_lora_rank, c.qk_rope_head_dim, self.heads
        q_in = c.q_lora_rank or hidden
        dense = frozenset(i for i, lay in enumerate(self.layers) if lay.moe is None)
        inter = c.intermediate_size
        matrices = [
            LoraMatrix("q", q_in, heads * self.qk, parts=1),
            LoraMatrix("kv_a", hidden, lat + rope, parts=1),
            LoraMatrix("o", heads * c.v_head_dim, hidden, parts=1),
        ]
        modules = {
            "q_b_proj" if c.q_lora_rank else "q_proj": LoraTarget("q", 0, (0, heads * self.qk)),
            "kv_a_proj_with_mqa": LoraTarget("kv_a", 0, (0, lat + rope)),
            "o_proj": LoraTarget("o", 0, (0, hidden)),
        }
        if c.q_lora_rank:
            matrices.append(LoraMatrix("q_a", hidden, c.q_lora_rank, parts=1))
            modules["q_a_proj"] = LoraTarget("q_a", 0, (0, c.q_lora_rank))
        if c.mla_mode == "mha":
            kv_b = heads * (c.qk_nope_head_dim + c.v_head_dim)
            matrices.append(LoraMatrix("kv_b", lat, kv_b, parts=1))
            modules["kv_b_proj"] = LoraTarget("kv_b", 0, (0, kv_b))
        if dense:
            matrices += [
                LoraMatrix("gate_up", hidden, 2 * inter, parts=2, layers=dense),
                LoraMatrix("down", inter, hidden, parts=1, layers=dense),
            ]
            modules["gate_proj"] = LoraTarget("gate_up", 0, (0, inter))
            modules["up_proj"] = LoraTarget("gate_up", 1, (inter, 2 * inter))
            modules["down_proj"] = LoraTarget("down", 0, (0, hidden))
        mixtures = frozenset(range(c.num_layers)) - dense
        parameters: tuple[str, ...] = ()
        if mixtures:
            inter_e, shared = c.moe_intermediate_size, c.shared_expert_intermediate_size
            experts = c.num_experts
            matrices += [
                LoraMatrix("experts_w13", hidden, 2 * inter_e, 2, mixtures, experts=experts),
                LoraMatrix("experts_w2", inter_e, hidden, 1, mixtures, experts=experts),
            ]
            parameters = ("experts.gate_up_proj", "experts.down_proj")  # PEFT's nesting order
            modules["experts.gate_up_proj"] = LoraTarget("experts_w13", 0, (0, 2 * inter_e))
            modules["experts.down_proj"] = LoraTarget("experts_w2", 0, (0, hidden))
            if shared:
                matrices += [
                    LoraMatrix("shared_gate_up", hidden, 2 * shared, 2, mixtures),
                    LoraMatrix("shared_down", shared, hidden, 1, mixtures),
                ]
                gate_up = LoraTarget("shared_gate_up", 0, (0, shared))
                modules["shared_experts.gate_proj"] = gate_up
                modules["shared_experts.up_proj"] = LoraTarget(
                    "shared_gate_up", 1, (shared, 2 * shared)
                )
                modules["shared_experts.down_proj"] = LoraTarget("shared_down", 0, (0, hidden))
        return LoraTargets(
            c.architecture, c.num_layers, tuple(matrices), modules, parameters=parameters
        )

    # forward ---------------------------------------------------------------------------
    def _rope_columns(self, x: torch.Tensor) -> torch.Tensor:
        """A rope part in transformers' order [..., rope] in kvrun's (the columns that
        :meth:`_rope_rows` permutes the weights' rows into)."""
        if not self.config.mla_rope_interleaved:
            return x
        return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)

    def _attention(
        self,
        lay: MlaLayer,
        h: torch.Tensor,  # [T, H] normed
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        lora: _Lora | None = None,  # the step's adapters, and this layer's index
    ) -> torch.Tensor:  # [T, H] the attention block's output (after o_proj)
        c, ops = self.config, self.ops
        t, heads = h.shape[0], self.heads
        nope, rope, v, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        x_q = h
        if lay.q_a is not None and lay.q_a_norm is not None:
            q_a = ops.linear(h, lay.q_a)
            if lora is not None:
                q_a = lora.apply("q_a", h, q_a)
            x_q = ops.rms_norm(q_a, lay.q_a_norm, _LATENT_NORM_EPS)
        kv = ops.linear(h, lay.kv_a)  # [T, lat + rope]
        # the adapters' q and kv_a deltas, in transformers' row order ([T, Hh, qk], [T, lat + rope])
        q_delta = kv_delta = None
        if lora is not None:
            kv_delta = lora.delta("kv_a", h, lat + rope)
            kv = kv + torch.cat((kv_delta[:, :lat], self._rope_columns(kv_delta[:, lat:])), -1)
            q_delta = lora.delta("q", x_q, heads * self.qk).view(t, heads, self.qk)
            q_delta = torch.cat((q_delta[..., :nope], self._rope_columns(q_delta[..., nope:])), -1)
        latent = ops.rms_norm(kv[:, :lat].contiguous(), lay.kv_a_norm, _LATENT_NORM_EPS)
        k_pe = kv[:, lat:].reshape(t, 1, rope)
        if c.mla_mode == "absorbed":
            w_uk = lay.kv_b.view(heads, nope + v, lat)[:, :nope]
            if c.mla_fused:
                q_lat = ops.linear(x_q, lay.q_latent).view(t, heads, lat)
                q_pe = ops.linear(x_q, lay.q_rope).view(t, heads, rope)
                if q_delta is not None:
                    q_lat = q_lat + torch.einsum("thn,hnc->thc", q_delta[..., :nope], w_uk)
                    q_pe = q_pe + q_delta[..., nope:]
            else:
                q = ops.linear(x_q, lay.q)
                q_nope = q[:, : heads * nope].view(t, heads, nope)
                q_pe = q[:, heads * nope :].view(t, heads, rope)
                if q_delta is not None:
                    q_nope, q_pe = q_nope + q_delta[..., :nope], q_pe + q_delta[..., nope:]
                q_lat = torch.einsum("thn,hnc->thc", q_nope, w_uk)
            q_pe, k_pe = ops.rotary_embedding(positions, q_pe.contiguous(), k_pe, self.cos_sin)
            key = torch.cat((latent.unsqueeze(1), k_pe), dim=-1)  # [T, 1, lat + rope]
            query = torch.cat((q_lat, q_pe), dim=-1)  # [T, Hh, lat + rope]
            out = _attend(self.attention, query, key, key, kv_cache, meta)[..., :lat]
            w_uv = lay.kv_b.view(heads, nope + v, lat)[:, nope:]
            if c.mla_fused:
                y: torch.Tensor = ops.linear(out.reshape(t, heads * lat), lay.o_latent)
                if lora is not None:  # o_proj's adapter reads the values W_o was fused with
                    values = torch.einsum("thc,hvc->thv", out, w_uv).reshape(t, heads * v)
                    y = y + lora.delta("o", values, c.hidden_size)
                return y
            values = torch.einsum("thc,hvc->thv", out, w_uv).reshape(t, heads * v)
            return self._o_proj(lay, values, lora)
        # VLLM_MLA_DISABLE: every head's key and value in the cache
        q = ops.linear(x_q, lay.q)
        q_nope = q[:, : heads * nope].view(t, heads, nope)
        q_pe = q[:, heads * nope :].view(t, heads, rope)
        if q_delta is not None:
            q_nope, q_pe = q_nope + q_delta[..., :nope], q_pe + q_delta[..., nope:]
        q_pe, k_pe = ops.rotary_embedding(positions, q_pe.contiguous(), k_pe, self.cos_sin)
        expanded = torch.nn.functional.linear(latent, lay.kv_b)
        if lora is not None:
            expanded = lora.apply("kv_b", latent, expanded)
        expanded = expanded.view(t, heads, nope + v)
        key = torch.cat((expanded[..., :nope], k_pe.expand(t, heads, rope)), dim=-1)
        value = torch.nn.functional.pad(expanded[..., nope:], (0, self.qk - v))
        query = torch.cat((q_nope, q_pe), dim=-1)
        out = _attend(self.attention, query, key, value, kv_cache, meta)[..., :v]
        return self._o_proj(lay, out.reshape(t, heads * v), lora)

    def _o_proj(self, lay: MlaLayer, values: torch.Tensor, lora: _Lora | None) -> torch.Tensor:
        y: torch.Tensor = self.ops.linear(values, lay.o)
        return y if lora is None else lora.apply("o", values, y)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,  # the step's adapters, when any token has one
    ) -> torch.Tensor:  # [T, H] final hidden states (normed)
        c, ops, par = self.config, self.ops, self.parallel
        eps = c.rms_norm_eps
        if par is None:
            residual = ops.embedding(input_ids, self.embed)
        else:  # the first stage's vocab-parallel embedding, or the previous stage's output
            residual = par.stage_input(
                ops, input_ids, self.embed, c.hidden_size, self.dtype, self.device
            )
        reduce = None if par is None else par.partial_sum
        h: torch.Tensor = ops.rms_norm(residual, self.layers[0].input_norm, eps)
        for i, lay in enumerate(self.layers):
            adapters = None if lora is None else _Lora(lora, i)
            x = self._attention(lay, h, positions, kv_caches[i], meta, adapters)
            if reduce is not None:  # the ranks' heads' partial o projections
                x = reduce(x)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.fused_add_rms_norm(x, residual, lay.post_norm, eps)
            if lay.moe is not None:
                if lora is None:
                    x = moe_mlp(ops, h, lay.moe, c)
                else:
                    x = lora_moe_mlp(ops, h, lay.moe, c, lora, i)
            else:
                gate_up = ops.linear(h, lay.gate_up)
                if adapters is not None:
                    gate_up = adapters.apply("gate_up", h, gate_up)
                inner = ops.silu_and_mul(gate_up)
                x = ops.linear(inner, lay.down)
                if adapters is not None:
                    x = adapters.apply("down", inner, x)
            if reduce is not None:  # the ranks' partial MLP (mixture + shared experts)
                x = reduce(x)
            h, residual = ops.fused_add_rms_norm(x, residual, next_norm, eps)
        if par is not None and not par.last_stage:
            par.send_residual(residual)
            # the next stage's input; this stage computes no logits
            return residual  # type: ignore[no-any-return]
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, V] fp32
        logits: torch.Tensor = self.ops.linear(hidden, self.lm_head)
        if self.parallel is not None:  # each rank's vocabulary columns, joined on tp_rank 0
            logits = self.parallel.gather_logits(logits)
        return logits.float()


@dataclass(frozen=True)
class _Lora:
    """The step's adapters at one layer (:meth:`DeepseekV2ForCausalLM.lora_targets`)."""

    batch: LoraBatch
    layer: int

    def apply(self, matrix: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.batch.apply(self.layer, matrix, x, y)

    def delta(self, matrix: str, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """The adapters' change alone, [T, out_features] (for projections whose rows the
        model holds reordered or fused with others)."""
        zero = torch.zeros(x.shape[0], out_features, dtype=x.dtype, device=x.device)
        return self.batch.apply(self.layer, matrix, x, zero)


def _attend(
    attention: AttentionBackend,
    query: torch.Tensor,  # [T, Hh, D]
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [T, Hh, D]
    out: torch.Tensor = attention.forward(
        query.contiguous(), key.contiguous(), value.contiguous(), kv_cache, meta
    )
    return out


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3: V2's model with V3's config (sigmoid routing with the correction
    bias, ``rope_interleave``) and its multi-token-prediction layers skipped."""

    decoder_layout: ClassVar[str] = "deepseek-v3: latent attention, routed experts"
