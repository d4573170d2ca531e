"""A Llama-family decoder written for export to OpenVINO, not for running in torch.

OpenVINO's paged-attention transformation looks for one ScaledDotProductAttention
per layer whose keys and values are the concatenation of a past-cache input with
the step's new keys and values (the shape optimum-intel's non-stateful export
produces). This module builds exactly that graph from kvrun's own checkpoint reader,
so it works from a Hugging Face directory or a GGUF file alike and needs neither
optimum-intel nor a particular transformers version. The transformation then swaps
each attention for PagedAttentionExtension reading kvrun's block tables.

Beyond what the transformation needs, the graph takes ``logits_indices`` and applies
the lm_head to those rows only, so a decode step does not pay for a vocab-sized
matmul on every prefill token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvrun.errors import ModelLoadError
from kvrun.models.config import ModelConfig
from kvrun.models.rope import inverse_frequencies, rope_type

__all__ = ["EXPORTABLE_ARCHITECTURES", "EXPORTABLE_ROPE_TYPES", "ExportDecoder"]

# The architectures whose weights and block structure ExportDecoder reproduces.
EXPORTABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The graph rotates with one set of frequencies and no cos/sin factor.
EXPORTABLE_ROPE_TYPES = ("default", "linear", "llama3")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [B, S, H]; computed in float32 as transformers does
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, D]; cos/sin: [B, 1, S, D]; the "rotate half" convention of HF Llama
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ExportDecoder(nn.Module):
    """input_ids, attention_mask, position_ids, logits_indices, beam_idx, past K/V -> outputs.

    Shapes (B batch, S new tokens, P past tokens, N selected rows):
    input_ids, position_ids [B, S] int64; attention_mask [B, P + S] int64;
    logits_indices [N] int64 into the flattened B*S tokens; beam_idx [B] int32 (the
    paged-attention pattern expects the past read through it); past_key_values.i.key/value
    [B, kv_heads, P, head_dim]. Returns logits [N, vocab] and the present K/V per layer.
    """

    def __init__(self, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        if config.architecture not in EXPORTABLE_ARCHITECTURES:
            raise ModelLoadError(
                f"architecture {config.architecture!r} cannot be exported to OpenVINO by "
                f"kvrun-openvino; supported: {', '.join(EXPORTABLE_ARCHITECTURES)}"
            )
        if rope_type(config.rope_scaling) not in EXPORTABLE_ROPE_TYPES:
            raise ModelLoadError(
                f"rope_scaling type {rope_type(config.rope_scaling)!r} cannot be exported to "
                f"OpenVINO by kvrun-openvino; supported: {', '.join(EXPORTABLE_ROPE_TYPES)}"
            )
        self.config = config
        params = {name.removeprefix("model."): t for name, t in weights}
        # Tied embeddings stay one constant in the IR, not a second vocab-sized copy.
        if config.tie_word_embeddings or "lm_head.weight" not in params:
            params.pop("lm_head.weight", None)
            self.lm_head = "embed_tokens.weight"
        else:
            self.lm_head = "lm_head.weight"
        self.w = nn.ParameterDict(
            {k.replace(".", "__"): nn.Parameter(v, requires_grad=False) for k, v in params.items()}
        )
        # A plain attribute, not a buffer: convert_model folds it into a constant either way.
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def _p(self, name: str) -> torch.Tensor:
        weight: torch.Tensor = self.w[name.replace(".", "__")]
        return weight

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        bias_key = f"{name}.bias".replace(".", "__")
        bias: torch.Tensor | None = self.w[bias_key] if bias_key in self.w else None  # noqa: SIM401
        return F.linear(x, self._p(f"{name}.weight"), bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_indices: torch.Tensor,
        beam_idx: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        c = self.config
        b, s = input_ids.shape
        h = F.embedding(input_ids, self._p("embed_tokens.weight"))
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, S, D]
        cos, sin = emb.cos(), emb.sin()
        # Causal mask over past + new tokens: new token i sees keys j <= P + i.
        total = attention_mask.shape[1]
        key_pos = torch.arange(total).view(1, 1, 1, total)
        query_pos = (total - s + torch.arange(s)).view(1, 1, s, 1)
        allowed = (key_pos <= query_pos) & attention_mask.view(b, 1, 1, total).bool()
        mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, float("-inf"))
        groups = c.num_heads // c.num_kv_heads
        present: list[torch.Tensor] = []
        for i in range(c.num_layers):
            pre = f"layers.{i}"
            x = _rms_norm(h, self._p(f"{pre}.input_layernorm.weight"), c.rms_norm_eps)
            q = self._linear(x, f"{pre}.self_attn.q_proj").view(b, s, c.num_heads, c.head_dim)
            k = self._linear(x, f"{pre}.self_attn.k_proj").view(b, s, c.num_kv_heads, c.head_dim)
            v = self._linear(x, f"{pre}.self_attn.v_proj").view(b, s, c.num_kv_heads, c.head_dim)
            q = _rotate(q.transpose(1, 2), cos, sin)
            k = torch.cat(
                (past[2 * i].index_select(0, beam_idx), _rotate(k.transpose(1, 2), cos, sin)), dim=2
            )
            v = torch.cat((past[2 * i + 1].index_select(0, beam_idx), v.transpose(1, 2)), dim=2)
            present += [k, v]
            # Grouped-query heads: repeat each K/V head for its query heads.
            # Shapes come from K/V themselves (not the mask) so that the transformation,
            # which drops attention_mask, leaves no reference to it.
            kr = (
                k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, c.num_heads, -1, c.head_dim)
            )
            vr = (
                v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, c.num_heads, -1, c.head_dim)
            )
            attn = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
            attn = attn.transpose(1, 2).reshape(b, s, c.num_heads * c.head_dim)
            h = h + self._linear(attn, f"{pre}.self_attn.o_proj")
            x = _rms_norm(h, self._p(f"{pre}.post_attention_layernorm.weight"), c.rms_norm_eps)
            gate = self._linear(x, f"{pre}.mlp.gate_proj")
            up = self._linear(x, f"{pre}.mlp.up_proj")
            h = h + self._linear(F.silu(gate) * up, f"{pre}.mlp.down_proj")
        h = _rms_norm(h, self._p("norm.weight"), c.rms_norm_eps)
        rows = h.reshape(b * s, -1).index_select(0, logits_indices)
        logits = F.linear(rows, self._p(self.lm_head))
        return (logits, *present)
