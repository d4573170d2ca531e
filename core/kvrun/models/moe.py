"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): routing and the layer block.

A router (one [E, H] matrix) scores every expert for each token; the ``top_k`` best,
weighted by their softmax probabilities (renormalized to sum to 1 where the model
does; DeepSeek: scaled by ``routed_scaling_factor``, optionally picked only from the
best expert groups; DeepSeek-V3: sigmoid scores, chosen with a correction bias), each run
a SiLU-gated MLP, and their outputs are summed by the
platform's ``fused_moe`` op. Qwen2-MoE adds a shared expert every token goes through,
scaled by a sigmoid gate; DeepSeek's shared experts are added as they are. Tokens are routed and run in chunks of ``moe_chunk_size``
(VLLM_FUSED_MOE_CHUNK_SIZE), which bounds the op's temporaries on long prefills.

Under tensor parallelism (kvrun.distributed) each rank holds every expert's and the
shared expert's share of the intermediate dimension (gate/up rows, down columns) and the
whole router: it routes each token as every other rank does, and :func:`moe_mlp` returns
its partial sum (the shared gate's sigmoid scales each rank's part alike), which one
all-reduce completes (``all_reduce`` of :func:`moe_block`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvrun.models.config import ModelConfig
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.lora.manager import LoraBatch

__all__ = [
    "MoeWeights",
    "empty_mixture",
    "lora_moe_mlp",
    "mixture_destinations",
    "moe_block",
    "moe_mlp",
    "prepare_mixture",
    "route",
]


@dataclass
class MoeWeights:
    """One mixture layer's weights. Once loaded, every matrix is what ``prepare_linear``
    returned for it, and ``w13`` and ``w2`` are what ``prepare_experts`` made of their
    experts' lists: the form ``fused_moe`` reads (until then, lists of plain matrices)."""

    router: Any  # [E, H]
    w13: Any  # [E] x [2I, H]: each expert's gate rows, then its up rows
    w2: Any  # [E] x [H, I]
    shared_gate_up: Any | None = None  # [2S, H] (Qwen2-MoE)
    shared_down: Any | None = None  # [H, S]
    shared_gate: Any | None = None  # [1, H]: the shared expert's sigmoid gate (Qwen2-MoE)
    # [E] float32, added to the sigmoid scores to choose experts, not to weight them
    # (DeepSeek-V3's e_score_correction_bias; topk_method "noaux_tc")
    correction_bias: torch.Tensor | None = None


def empty_mixture(
    config: ModelConfig, empty: Callable[..., torch.Tensor], *, gated_shared: bool
) -> MoeWeights:
    """One mixture layer's tensors, unfilled; ``gated_shared``: the shared expert (if the
    config has one) has Qwen2-MoE's sigmoid gate."""
    experts, inter = config.num_experts, config.moe_intermediate_size
    hidden, shared = config.hidden_size, config.shared_expert_intermediate_size
    return MoeWeights(
        router=empty(experts, hidden),
        w13=[empty(2 * inter, hidden) for _ in range(experts)],
        w2=[empty(hidden, inter) for _ in range(experts)],
        shared_gate_up=empty(2 * shared, hidden) if shared else None,
        shared_down=empty(hidden, shared) if shared else None,
        shared_gate=empty(1, hidden) if shared and gated_shared else None,
    )


def mixture_destinations(
    prefix: str,  # the mixture module's name and a dot, e.g. "model.layers.3.mlp."
    moe: MoeWeights,
    config: ModelConfig,
    *,
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    shared_module: str = "shared_expert",
) -> dict[str, Any]:
    """Hugging Face names of one mixture layer's weights -> our tensors (slices of w13
    for each expert's gate and up rows). Mixtral names its experts' projections w1, w3,
    w2; DeepSeek its shared experts ``shared_experts``."""
    inter = config.moe_intermediate_size
    dest: dict[str, Any] = {prefix + "gate.weight": moe.router}
    for e in range(config.num_experts):
        gate, up, down = (f"{prefix}experts.{e}.{n}.weight" for n in expert_names)
        dest[gate] = moe.w13[e][:inter]
        dest[up] = moe.w13[e][inter:]
        dest[down] = moe.w2[e]
    if moe.shared_gate_up is not None:
        shared, p = config.shared_expert_intermediate_size, prefix + shared_module
        dest[p + ".gate_proj.weight"] = moe.shared_gate_up[:shared]
        dest[p + ".up_proj.weight"] = moe.shared_gate_up[shared:]
        dest[p + ".down_proj.weight"] = moe.shared_down
    if moe.shared_gate is not None:
        dest[prefix + shared_module + "_gate.weight"] = moe.shared_gate
    return dest


def prepare_mixture(moe: MoeWeights, ops: OpTable) -> None:
    """Every matrix of the mixture in the platform's form (``ops.prepare_linear``); each
    projection's experts then as one whole (``ops.prepare_experts``: the reference keeps
    the list, kvrun-cuda stacks them into the [E, N, K] tensor its Triton kernel reads)."""
    prepare = ops.prepare_linear
    moe.router = prepare(moe.router)
    moe.w13 = ops.prepare_experts([prepare(w) for w in moe.w13])
    moe.w2 = ops.prepare_experts([prepare(w) for w in moe.w2])
    if moe.shared_gate_up is not None:
        moe.shared_gate_up = prepare(moe.shared_gate_up)
        moe.shared_down = prepare(moe.shared_down)
    if moe.shared_gate is not None:
        moe.shared_gate = prepare(moe.shared_gate)


def route(
    ops: OpTable, h: torch.Tensor, moe: MoeWeights, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:  # (weights [T, K] float32, expert ids [T, K] int64)
    """Each token's ``num_experts_per_tok`` experts and their weights, as Hugging Face
    routes: softmax over all experts in float32, top-k, renormalized where configured;
    DeepSeek-V3 ("noaux_tc"): :func:`_route_noaux_tc`."""
    logits = ops.linear(h, moe.router).float()
    if config.topk_method == "noaux_tc":
        return _route_noaux_tc(logits, moe.correction_bias, config)
    probs = torch.softmax(logits, dim=-1)
    if config.topk_method == "group_limited_greedy":  # DeepSeek: the best groups' experts
        groups = probs.view(probs.shape[0], config.n_group, -1)
        best = torch.topk(groups.amax(dim=-1), config.topk_group, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0]).scatter_(1, best, 1.0).bool()
        probs = groups.masked_fill(~keep.unsqueeze(-1), 0.0).view_as(probs)
    weights, ids = torch.topk(probs, config.num_experts_per_tok, dim=-1)
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return weights, ids


def _route_noaux_tc(
    logits: torch.Tensor,  # [T, E] float32
    bias: torch.Tensor | None,  # [E]
    config: ModelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing: sigmoid scores; the experts are chosen by score + the
    correction bias, only from the ``topk_group`` of ``n_group`` groups whose two best
    biased scores sum highest; each chosen expert is weighted by its unbiased score,
    renormalized over the chosen (``norm_topk_prob``), times ``routed_scaling_factor``."""
    if bias is None:
        raise ValueError("topk_method 'noaux_tc' needs the router's e_score_correction_bias")
    scores = torch.sigmoid(logits)
    biased = scores + bias.float()
    groups = biased.view(biased.shape[0], config.n_group, -1)
    group_scores = torch.topk(groups, min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, config.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores).scatter_(1, best, 1.0).bool()
    choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(biased)
    ids = torch.topk(choice, config.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor, ids


def moe_mlp(ops: OpTable, h: torch.Tensor, moe: MoeWeights, config: ModelConfig) -> torch.Tensor:
    """The mixture's output for normed hidden states ``h`` [T, H], chunk by chunk."""
    chunk = max(1, config.moe_chunk_size)
    outputs = []
    for start in range(0, h.shape[0], chunk):
        part = h[start : start + chunk]
        weights, ids = route(ops, part, moe, config)
        out = ops.fused_moe(part, moe.w13, moe.w2, weights, ids)
        if moe.shared_gate_up is not None:
            shared = ops.linear(
                ops.silu_and_mul(ops.linear(part, moe.shared_gate_up)), moe.shared_down
            )
            if moe.shared_gate is not None:  # Qwen2-MoE gates it; DeepSeek adds it as is
                shared = torch.sigmoid(ops.linear(part, moe.shared_gate)) * shared
            out = out + shared
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def moe_block(
    ops: OpTable,
    config: ModelConfig,
    attn: torch.Tensor,  # [T, Hq * D] attention output of layer i
    residual: torch.Tensor,  # [T, H]
    o: Any,  # [H, Hq * D]
    post_norm: torch.Tensor,  # [H]
    moe: MoeWeights,
    next_norm: torch.Tensor,  # [H] layer i+1's input norm, or the final norm
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed input of layer i+1, residual)
    """:func:`kvrun.models.llama.dense_block` with the mixture in place of the MLP;
    ``all_reduce`` sums the ranks' partial o and mixture outputs (tensor parallelism)."""
    eps = config.rms_norm_eps
    x = ops.linear(attn, o)
    if all_reduce is not None:
        x = all_reduce(x)
    h, residual = ops.fused_add_rms_norm(x, residual, post_norm, eps)
    x = moe_mlp(ops, h, moe, config)
    if all_reduce is not None:
        x = all_reduce(x)
    return ops.fused_add_rms_norm(x, residual, next_norm, eps)  # type: ignore[no-any-return]


def lora_moe_mlp(
    ops: OpTable,
    h: torch.Tensor,  # [T, H] normed hidden states of the step
    moe: MoeWeights,
    config: ModelConfig,
    lora: LoraBatch,
    layer: int,
) -> torch.Tensor:  # [T, H], as moe_mlp
    """:func:`moe_mlp` with each token's LoRA adapter on the shared expert's projections
    (matrices ``shared_gate_up``, ``shared_down``) and, when the step's adapters change
    the routed experts (``lora.adapts_experts``), on each expert's: then the experts run
    here, one at a time as the reference ``fused_moe`` does, each expert's gate|up delta
    added before the activation and its down delta after (``experts_w13``,
    ``experts_w2``). Otherwise the platform's ``fused_moe`` runs them. Under tensor
    parallelism the adapters are the rank's share of the intermediate dimension
    (kvrun.lora.sharding), so the output is the rank's partial sum, as moe_mlp's."""
    chunk = max(1, config.moe_chunk_size)
    outputs = []
    for start in range(0, h.shape[0], chunk):
        part = h[start : start + chunk]
        rows = torch.arange(start, start + part.shape[0], device=h.device)
        weights, ids = route(ops, part, moe, config)
        if lora.adapts_experts:
            out = _experts_with_lora(ops, part, moe, weights, ids, lora, layer, rows)
        else:
            out = ops.fused_moe(part, moe.w13, moe.w2, weights, ids)
        if moe.shared_gate_up is not None:
            gate_up = ops.linear(part, moe.shared_gate_up)
            gate_up = lora.apply_rows(layer, "shared_gate_up", part, gate_up, rows)
            inner = ops.silu_and_mul(gate_up)
            shared = ops.linear(inner, moe.shared_down)
            shared = lora.apply_rows(layer, "shared_down", inner, shared, rows)
            if moe.shared_gate is not None:
                shared = torch.sigmoid(ops.linear(part, moe.shared_gate)) * shared
            out = out + shared
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _experts_with_lora(
    ops: OpTable,
    hidden: torch.Tensor,  # [n, H]
    moe: MoeWeights,
    topk_weights: torch.Tensor,  # [n, K] float32
    topk_ids: torch.Tensor,  # [n, K] int64
    lora: LoraBatch,
    layer: int,
    rows: torch.Tensor,  # [n] the step's token index of each row
) -> torch.Tensor:  # [n, H]
    """The reference ``fused_moe`` (experts in id order, each output weighted in float32)
    with each token's adapter added to its experts' projections. ``moe.w13[e]`` is an
    expert's matrix whether ``prepare_experts`` kept a list or stacked ``[E, N, K]``."""
    out = torch.zeros_like(hidden)
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(moe.w13)).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // k
        x = hidden.index_select(0, tokens)
        step_rows = rows.index_select(0, tokens)
        gate_up = ops.linear(x, moe.w13[expert])
        gate_up = lora.apply_rows(layer, "experts_w13", x, gate_up, step_rows, expert)
        inner = ops.silu_and_mul(gate_up)
        y = ops.linear(inner, moe.w2[expert])
        y = lora.apply_rows(layer, "experts_w2", inner, y, step_rows, expert)
        weight = topk_weights.reshape(-1).index_select(0, pairs)[:, None]
        out.index_add_(0, tokens, (y * weight).to(out.dtype))
    return out
