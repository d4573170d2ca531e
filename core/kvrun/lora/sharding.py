"""One tensor/pipeline-parallel rank's share of a LoRA adapter.

An adapter changes ``y = x W^T`` into ``y + s (x A^T) B^T``. It is split exactly as the
projection it attaches to (kvrun.distributed.parallel, through the same
:func:`~kvrun.distributed.parallel.weight_plan` and
:func:`~kvrun.distributed.parallel.shard_weights`, so the two cannot disagree):

- column-parallel projections (q, k, v, gate, up; Phi-3's merged qkv_proj and
  gate_up_proj; DeepSeek's q/q_b and kv_b, split by heads): the rank computes some output
  rows, so B keeps those rows and A stays whole (``x A^T`` is the same on every rank);
- row-parallel projections (o, down): the rank holds some input columns of ``x``, so A
  keeps those columns and B stays whole; each rank's ``(x_r A_r^T) B^T`` is a partial
  sum of the delta, added to the rank's partial ``y`` *before* the all-reduce, which
  then sums both (the models' lora_dense_block, lora_moe_block, Gemma's and DeepSeek's
  forward);
- a mixture's routed experts (one A and B per expert: ``[E, r, in]``, ``[E, out, r]``)
  are split as each expert's weights are, by the expert intermediate dimension: the
  gate/up B rows (the fused ``experts.gate_up_proj``: the gate's rows, then the up's) and
  the down A columns; the shared expert likewise by its own intermediate dimension;
- replicated projections (DeepSeek's latent path q_a, kv_a): the adapter stays whole.

A pipeline stage keeps its own layers' modules, renumbered from 0 as its model is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvrun.distributed.parallel import ShardLayout, shard_weights, weight_plan
from kvrun.lora.adapter import LoraAdapter, LoraError
from kvrun.models.config import ModelConfig

__all__ = ["shard_adapter", "unsplit_modules"]

# PEFT module (relative to the layer's self_attn. or mlp.) -> (the checkpoint weight it
# adapts, relative to the layer, whether it is column-parallel). A routed expert's
# module is read as expert 0's weight (every expert is split alike).
_MODULES = {
    "q_proj": ("self_attn.q_proj", True),
    "k_proj": ("self_attn.k_proj", True),
    "v_proj": ("self_attn.v_proj", True),
    "qkv_proj": ("self_attn.qkv_proj", True),
    "o_proj": ("self_attn.o_proj", False),
    "q_a_proj": ("self_attn.q_a_proj", True),  # replicated: weight_plan keeps it whole
    "q_b_proj": ("self_attn.q_b_proj", True),
    "kv_a_proj_with_mqa": ("self_attn.kv_a_proj_with_mqa", True),  # replicated
    "kv_b_proj": ("self_attn.kv_b_proj", True),
    "gate_proj": ("mlp.gate_proj", True),
    "up_proj": ("mlp.up_proj", True),
    "gate_up_proj": ("mlp.gate_up_proj", True),
    "down_proj": ("mlp.down_proj", False),
    "shared_expert.gate_proj": ("mlp.shared_expert.gate_proj", True),
    "shared_expert.up_proj": ("mlp.shared_expert.up_proj", True),
    "shared_expert.down_proj": ("mlp.shared_expert.down_proj", False),
    "shared_experts.gate_proj": ("mlp.shared_experts.gate_proj", True),
    "shared_experts.up_proj": ("mlp.shared_experts.up_proj", True),
    "shared_experts.down_proj": ("mlp.shared_experts.down_proj", False),
    "experts.gate_up_proj": ("mlp.experts.0.gate_proj", True),  # gate rows, then up rows
    "experts.down_proj": ("mlp.experts.0.down_proj", False),
    "experts.gate_proj": ("mlp.experts.0.gate_proj", True),
    "experts.up_proj": ("mlp.experts.0.up_proj", True),
    "experts.w1": ("block_sparse_moe.experts.0.w1", True),
    "experts.w3": ("block_sparse_moe.experts.0.w3", True),
    "experts.w2": ("block_sparse_moe.experts.0.w2", False),
}


def unsplit_modules(modules: Iterable[str]) -> list[str]:
    """The PEFT modules among ``modules`` (a model's LoRA surface) that tensor-parallel
    ranks cannot split: the engine refuses such a model's adapters under TP when built."""
    return [module for module in modules if module not in _MODULES]


def shard_adapter(adapter: LoraAdapter, layout: ShardLayout, model: ModelConfig) -> LoraAdapter:
    """``adapter`` (read against the whole model) as the rank of ``layout`` applies it."""
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), (a, b) in adapter.weights.items():
        where = _MODULES.get(module)
        if where is None and layout.tp_size > 1:
            raise LoraError(
                f"LoRA adapter {adapter.request.lora_name!r}: {model.architecture}'s module "
                f"{module} is not split across tensor-parallel ranks yet; accepted there: "
                f"{', '.join(_MODULES)}"
            )
        kind, column = where or ("mlp", True)
        part = b if column else a
        name = f"model.layers.{layer}.{kind}.weight"
        plan = weight_plan(name, tuple(part.shape[-2:]), layout, model)
        if plan is not None:
            dim, spans = plan
            if module == "experts.gate_up_proj":  # the up rows follow the gate's
                inter = model.moe_intermediate_size
                spans = (*spans, *((start + inter, end + inter) for start, end in spans))
            lead = (slice(None),) * (dim + part.dim() - 2)  # past an expert module's [E]
            pieces = [part[(*lead, slice(start, end))] for start, end in spans]
            part = torch.cat(pieces, dim + part.dim() - 2).contiguous()
        sliced = list(shard_weights([(name, part)], layout, model, narrowed=True))
        if not sliced:  # another pipeline stage's layer
            continue
        local_name, part = sliced[0]
        local_layer = int(local_name.split(".")[2])
        weights[(local_layer, module)] = (a, part) if column else (part, b)
    return LoraAdapter(adapter.request, adapter.rank, adapter.scale, weights)
