"""DeepSeek-V2 (multi-head latent attention and routed experts) as kvrun code.

Attention per layer: q from ``q_proj`` (or ``q_a_proj`` -> norm -> ``q_b_proj``), each
head [q_nope | q_pe]; ``kv_a_proj_with_mqa`` gives the latent c (normed,
``kv_lora_rank`` wide) and one shared rope key k_pe; ``kv_b_proj`` expands c into each
head's k_nope (W_UK) and value (W_UV). Scores are q_nope . k_nope + q_pe . k_pe, scaled
by qk_head_dim ** -0.5 (times yarn's mscale squared).

The cache holds the latent, not the heads ("absorbed", the default): since
q_nope . (W_UK c) = (q_nope W_UK) . c, attention is multi-query over one kv head of
width kv_lora_rank + rope, key = value = [c | k_pe], with each query head
[q_nope W_UK | q_pe]; the first kv_lora_rank columns of its output are sum(p c), which
W_UV and o_proj turn into the layer's output. Any attention backend runs that, and the
cache costs (kv_lora_rank + rope) per token and plane instead of every head's key and
value. With VLLM_MLA_PERFORM_MATRIX_ABSORPTION (the default) the products W_q W_UK
and W_o W_UV are computed once at load (fused matrices); without it they are applied
one after the other in each step. VLLM_MLA_DISABLE=1 caches every head's key and value
(values zero-padded to the key's width) and runs plain multi-head attention.

transformers rotates q_pe and k_pe in interleaved pairs (2i, 2i+1); kvrun's rotary
pairs (i, i + d/2). The rows of both rope projections are permuted at load (evens, then
odds), which turns one into the other and leaves every q_pe . k_pe unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.errors import ModelLoadError
from kvrun.models.config import ModelConfig
from kvrun.models.moe import (
    MoeWeights,
    empty_mixture,
    mixture_destinations,
    moe_mlp,
    prepare_mixture,
)
from kvrun.models.rope import cos_sin_cache
from kvrun.models.weights import fill_parameters
from kvrun.ops import OpTable

__all__ = ["DeepseekV2ForCausalLM"]

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

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        c = config
        if not c.is_mla:
            raise ModelLoadError(f"{c.architecture}: the config has no kv_lora_rank")
        self.config, self.ops, self.attention = config, ops, attention
        self.dtype, self.device = dtype, device
        self.heads = c.num_heads
        self.qk = c.qk_nope_head_dim + c.qk_rope_head_dim

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        q_in = c.q_lora_rank or c.hidden_size

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
                moe=empty_mixture(c, empty, gated_shared=False) if moe else None,
            )

        self.embed: Any = empty(c.vocab_size, c.hidden_size)
        self.layers = [layer(i) for i in range(c.num_layers)]
        self.norm = empty(c.hidden_size)
        self.lm_head: Any = (
            self.embed if c.tie_word_embeddings else empty(c.vocab_size, c.hidden_size)
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
        dest = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
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
        return dest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        assert not self._prepared, "weights are loaded once"
        fill_parameters(
            self._destinations(),
            weights,
            source=source,
            architecture=self.config.architecture,
            tied=self.config.tie_word_embeddings,
        )
        self._prepare()

    def _rope_rows(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """The rope part's rows of ``count`` heads reordered (evens, then odds): see the
        module docstring. ``rows``: [count * rope, ...]."""
        rope = self.config.qk_rope_head_dim
        order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
        return rows.view(count, rope, -1)[:, order].reshape(rows.shape)

    def _prepare(self) -> None:
        c, prepare = self.config, self.ops.prepare_linear
        nope, rope, v, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
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
            if c.mla_mode == "absorbed" and c.mla_fused:
                # q_lat[h] = x @ (W_UK[h]^T @ W_q_nope[h])^T; out = sum_h o_lat[h] @ (W_o[:, h] @ W_UV[h])^T
                fused_q = torch.einsum("hnc,hni->hci", w_uk.float(), q_nope.float())
                lay.q_latent = prepare(fused_q.reshape(self.heads * lat, -1).to(self.dtype))
                o = lay.o.view(-1, self.heads, v).float()  # [H, Hh, v]
                fused_o = torch.einsum("ohv,hvc->ohc", o, w_uv.float())
                lay.o_latent = prepare(fused_o.reshape(o.shape[0], -1).to(self.dtype))
                lay.q_rope = prepare(q_rope.contiguous())
                lay.q = lay.o = None
            else:
                merged = torch.cat((q_nope.reshape(self.heads * nope, -1), q_rope))
                lay.q = prepare(merged.contiguous())  # [Hh * nope | Hh * rope, in]
                lay.o = prepare(lay.o)
            if lay.moe is None:
                lay.gate_up, lay.down = prepare(lay.gate_up), prepare(lay.down)
            else:
                prepare_mixture(lay.moe, prepare)
        tied = self.lm_head is self.embed
        self.embed = prepare(self.embed)
        self.lm_head = self.embed if tied else prepare(self.lm_head)
        self._prepared = True

    # forward ---------------------------------------------------------------------------
    def _attention(
        self,
        lay: MlaLayer,
        h: torch.Tensor,  # [T, H] normed
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] the attention block's output (after o_proj)
        c, ops = self.config, self.ops
        t, heads = h.shape[0], self.heads
        nope, rope, v, lat = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        x_q = h
        if lay.q_a is not None and lay.q_a_norm is not None:
            x_q = ops.rms_norm(ops.linear(h, lay.q_a), lay.q_a_norm, _LATENT_NORM_EPS)
        kv = ops.linear(h, lay.kv_a)  # [T, lat + rope]
        latent = ops.rms_norm(kv[:, :lat].contiguous(), lay.kv_a_norm, _LATENT_NORM_EPS)
        k_pe = kv[:, lat:].reshape(t, 1, rope)
        if c.mla_mode == "absorbed":
            if c.mla_fused:
                q_lat = ops.linear(x_q, lay.q_latent).view(t, heads, lat)
                q_pe = ops.linear(x_q, lay.q_rope).view(t, heads, rope)
            else:
                q = ops.linear(x_q, lay.q)
                q_nope = q[:, : heads * nope].view(t, heads, nope)
                q_pe = q[:, heads * nope :].view(t, heads, rope)
                w_uk = lay.kv_b.view(heads, nope + v, lat)[:, :nope]
                q_lat = torch.einsum("thn,hnc->thc", q_nope, w_uk)
            q_pe, k_pe = ops.rotary_embedding(positions, q_pe.contiguous(), k_pe, self.cos_sin)
            key = torch.cat((latent.unsqueeze(1), k_pe), dim=-1)  # [T, 1, lat + rope]
            query = torch.cat((q_lat, q_pe), dim=-1)  # [T, Hh, lat + rope]
            out = _attend(self.attention, query, key, key, kv_cache, meta)[..., :lat]
            if c.mla_fused:
                return ops.linear(out.reshape(t, heads * lat), lay.o_latent)  # type: ignore[no-any-return]
            w_uv = lay.kv_b.view(heads, nope + v, lat)[:, nope:]
            values = torch.einsum("thc,hvc->thv", out, w_uv)
            return ops.linear(values.reshape(t, heads * v), lay.o)  # type: ignore[no-any-return]
        # VLLM_MLA_DISABLE: every head's key and value in the cache
        q = ops.linear(x_q, lay.q)
        q_nope = q[:, : heads * nope].view(t, heads, nope)
        q_pe = q[:, heads * nope :].view(t, heads, rope)
        q_pe, k_pe = ops.rotary_embedding(positions, q_pe.contiguous(), k_pe, self.cos_sin)
        expanded = torch.nn.functional.linear(latent, lay.kv_b).view(t, heads, nope + v)
        key = torch.cat((expanded[..., :nope], k_pe.expand(t, heads, rope)), dim=-1)
        value = torch.nn.functional.pad(expanded[..., nope:], (0, self.qk - v))
        query = torch.cat((q_nope, q_pe), dim=-1)
        out = _attend(self.attention, query, key, value, kv_cache, meta)[..., :v]
        return ops.linear(out.reshape(t, heads * v), lay.o)  # type: ignore[no-any-return]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] final hidden states (normed)
        c, ops = self.config, self.ops
        eps = c.rms_norm_eps
        residual = ops.embedding(input_ids, self.embed)
        h: torch.Tensor = ops.rms_norm(residual, self.layers[0].input_norm, eps)
        for i, lay in enumerate(self.layers):
            x = self._attention(lay, h, positions, kv_caches[i], meta)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.fused_add_rms_norm(x, residual, lay.post_norm, eps)
            if lay.moe is not None:
                x = moe_mlp(ops, h, lay.moe, c)
            else:
                x = ops.linear(ops.silu_and_mul(ops.linear(h, lay.gate_up)), lay.down)
            h, residual = ops.fused_add_rms_norm(x, residual, next_norm, eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, V] fp32
        logits: torch.Tensor = self.ops.linear(hidden, self.lm_head)
        return logits.float()


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
