"""Which part of the model each rank holds: pure arithmetic, no torch.distributed.

Ranks are numbered ``rank = pp_rank * tp_size + tp_rank`` (as in vLLM): the ranks of
one pipeline stage are consecutive, and the driver rank (the one that returns logits to
the engine) is tp_rank 0 of the last stage.

Tensor parallelism splits each layer (Megatron style): q/k/v and gate/up by output
rows (column-parallel), o and down by input columns (row-parallel, summed by an
all-reduce), the embedding and lm_head by vocabulary rows. Pipeline parallelism splits
the layers into consecutive runs, one per stage.

Mixtures (Mixtral, Qwen2/3-MoE, DeepSeek) split every expert as vLLM does by default:
each expert's gate/up rows and down columns by its intermediate dimension, the shared
expert likewise; the router (and Qwen2-MoE's shared-expert gate, DeepSeek-V3's
correction bias) is replicated, so every rank routes each token alike and one
all-reduce sums the mixture's partial outputs. DeepSeek's latent attention splits by
heads (q or q_b, kv_b by rows, o by columns) and replicates the latent path (q_a,
kv_a and their norms): each rank caches the whole latent, as vLLM's ranks do.

Invariants of :class:`ShardLayout`:
- the stages' layer ranges tile ``[0, num_layers)`` in order, none empty;
- each rank's q heads are consecutive, ``num_heads / tp_size`` of them, and the kv heads
  it holds are exactly those its q heads read (GQA groups never straddle ranks);
- each rank's rows of the dense MLP, of every expert and of the shared expert are the
  consecutive ``1 / tp_size`` share of that intermediate dimension at ``tp_rank``;
- the vocabulary slices tile ``[0, tp_size * vocab_shard)``, which covers the vocabulary;
  rows past ``vocab_size`` are zero padding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvrun.errors import ConfigError
from kvrun.loader.safetensors_loader import ReadPlan, read_parts
from kvrun.models.config import ModelConfig

__all__ = [
    "ParallelConfig",
    "ShardLayout",
    "check_heads",
    "check_intermediate",
    "partition_layers",
    "shard_weights",
    "weight_plan",
]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")  # a decoder layer's tensor
# a mixture's tensors: Qwen's and DeepSeek's mlp.experts.<e>.gate_proj, Mixtral's
# block_sparse_moe.experts.<e>.w1 (gate), w3 (up), w2 (down)
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.\d+\.(\w+)$")
_SHARED = re.compile(r"^mlp\.shared_experts?\.(\w+)$")  # Qwen2-MoE's / DeepSeek's
_COLUMN = frozenset({"gate_proj", "up_proj", "w1", "w3"})  # split by output rows
_ROW = frozenset({"down_proj", "w2"})  # split by input columns


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks split each layer (tensor) and the layer stack (pipeline)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} is not valid; accepted: an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return divmod(rank, self.tensor_parallel_size)

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tensor_parallel_size + tp_rank

    @property
    def driver_rank(self) -> int:
        """tp_rank 0 of the last stage: the rank whose step returns the logits."""
        return self.rank_of(self.pipeline_parallel_size - 1, 0)


def partition_layers(
    num_layers: int, pp_size: int, partition: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Each stage's ``[start, end)`` layer range.

    ``partition`` (VLLM_PP_LAYER_PARTITION) gives each stage's layer count; it must have
    ``pp_size`` entries summing to ``num_layers``. Without it the layers split evenly and
    the remainder goes one each to the *earlier* stages (stage 0 also embeds, the last
    stage also computes the lm_head; kvrun favours neither: 10 layers on 3 stages are
    4, 3, 3).
    """
    if partition is not None:
        counts = list(partition)
        if len(counts) != pp_size:
            raise ConfigError(
                f"VLLM_PP_LAYER_PARTITION={','.join(map(str, counts))} has {len(counts)} "
                f"entries, but pipeline_parallel_size is {pp_size}; give one count per stage"
            )
        if sum(counts) != num_layers:
            raise ConfigError(
                f"VLLM_PP_LAYER_PARTITION={','.join(map(str, counts))} sums to {sum(counts)}, "
                f"but the model has {num_layers} layers; the counts must add up to it"
            )
        if min(counts) < 1:
            raise ConfigError(
                f"VLLM_PP_LAYER_PARTITION={','.join(map(str, counts))} gives a stage no "
                "layers; accepted: counts >= 1"
            )
    else:
        if pp_size > num_layers:
            raise ConfigError(
                f"pipeline_parallel_size={pp_size} is more than the model's {num_layers} "
                "layers; every stage needs at least one"
            )
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if s < extra else 0) for s in range(pp_size)]
    ranges = []
    start = 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def check_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Refuse a head count tensor parallelism cannot split, naming both numbers."""
    if num_heads % tp_size:
        raise ConfigError(
            f"the model's {num_heads} attention heads are not divisible by "
            f"tensor_parallel_size={tp_size}; accepted: a tensor_parallel_size dividing {num_heads}"
        )
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ConfigError(
            f"the model's {num_kv_heads} KV heads and tensor_parallel_size={tp_size}: one "
            "must divide the other (KV heads are split, or replicated when fewer than the "
            "ranks)"
        )


def check_intermediate(model: ModelConfig, tp_size: int) -> None:
    """Refuse an MLP, expert or shared expert whose intermediate dimension tensor
    parallelism cannot split, naming the size and the rank count."""
    dense = not model.moe_layers or not all(model.moe_layers)
    sizes = [("intermediate_size", model.intermediate_size if dense else 0)]
    if model.is_moe:
        sizes.append(("moe_intermediate_size (each expert's)", model.moe_intermediate_size))
        sizes.append(("shared expert's intermediate size", model.shared_expert_intermediate_size))
    for what, size in sizes:
        if size % tp_size:
            raise ConfigError(
                f"the model's {what}={size} is not divisible by tensor_parallel_size="
                f"{tp_size}; accepted: a tensor_parallel_size dividing {size}"
            )


def _share(size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    part = size // tp_size
    return (tp_rank * part, (tp_rank + 1) * part)


@dataclass(frozen=True)
class ShardLayout:
    """One rank's share of a model (see the module docstring for the invariants)."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    layers: tuple[int, int]  # [start, end) of the global layer indices this stage runs
    q_heads: tuple[int, int]  # [start, end) of the q heads
    kv_heads: tuple[int, int]  # [start, end) of the kv heads (replicated: one head)
    intermediate: tuple[int, int]  # [start, end) of the MLP's intermediate rows
    vocab_start: int
    vocab_shard: int  # rows per rank (the last rank's may run past the vocabulary)
    vocab_size: int  # the model's whole vocabulary
    # [start, end) of each expert's intermediate rows, and of the shared expert's
    moe_intermediate: tuple[int, int] = (0, 0)
    shared_intermediate: tuple[int, int] = (0, 0)

    @classmethod
    def build(
        cls,
        model: ModelConfig,
        parallel: ParallelConfig,
        rank: int,
        partition: Sequence[int] | None = None,
    ) -> ShardLayout:
        tp = parallel.tensor_parallel_size
        pp_rank, tp_rank = parallel.coordinates(rank)
        check_heads(model.num_heads, model.num_kv_heads, tp)
        check_intermediate(model, tp)
        stages = partition_layers(model.num_layers, parallel.pipeline_parallel_size, partition)
        heads = model.num_heads // tp
        if model.num_kv_heads >= tp:
            kv = model.num_kv_heads // tp
            kv_heads = (tp_rank * kv, (tp_rank + 1) * kv)
        else:  # replicated: ranks sharing a kv head are those whose q heads read it
            head = tp_rank // (tp // model.num_kv_heads)
            kv_heads = (head, head + 1)
        shard = -(-model.vocab_size // tp)
        return cls(
            tp_rank=tp_rank,
            tp_size=tp,
            pp_rank=pp_rank,
            pp_size=parallel.pipeline_parallel_size,
            layers=stages[pp_rank],
            q_heads=(tp_rank * heads, (tp_rank + 1) * heads),
            kv_heads=kv_heads,
            intermediate=_share(model.intermediate_size, tp, tp_rank),
            vocab_start=tp_rank * shard,
            vocab_shard=shard,
            vocab_size=model.vocab_size,
            moe_intermediate=_share(model.moe_intermediate_size, tp, tp_rank),
            shared_intermediate=_share(model.shared_expert_intermediate_size, tp, tp_rank),
        )

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def holds_embedding(self, tied: bool) -> bool:
        """Stage 0 embeds; the last stage also needs the table when it is the lm_head."""
        return self.first_stage or (tied and self.last_stage)

    def wants(self, name: str, tied: bool) -> bool:
        """Whether this rank needs the checkpoint tensor ``name`` (a Hugging Face name):
        its stage's layers, the embedding, final norm and lm_head where it holds them, and
        anything else (which the loader then judges)."""
        match = _LAYER.match(name)
        if match is not None:
            return self.layers[0] <= int(match.group(1)) < self.layers[1]
        if name == "model.embed_tokens.weight":
            return self.holds_embedding(tied)
        if name == "lm_head.weight":
            return self.last_stage and not tied
        if name == "model.norm.weight":
            return self.last_stage
        return True

    def rank_config(self, model: ModelConfig) -> ModelConfig:
        """The shape of this rank's model: its heads, MLP rows, layers and vocab rows."""
        start, end = self.layers
        return replace(
            model,
            num_heads=self.q_heads[1] - self.q_heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
            moe_intermediate_size=self.moe_intermediate[1] - self.moe_intermediate[0],
            shared_expert_intermediate_size=(
                self.shared_intermediate[1] - self.shared_intermediate[0]
            ),
            num_layers=end - start,
            vocab_size=self.vocab_shard,
            layer_windows=model.layer_windows[start:end],
            moe_layers=model.moe_layers[start:end],
        )


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    layout: ShardLayout,
    model: ModelConfig,
    *,
    narrowed: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's slices of a checkpoint's (name, tensor) stream (the Llama family,
    its mixtures, Gemma 2/3, DeepSeek-V2/V3).

    Layer names are renumbered to the stage's own indices (``model.layers.<i - start>``);
    other stages' layers, and the embedding, final norm and lm_head where this stage
    does not hold them, are dropped. Everything else passes as it is (the loader then
    names any weight the model does not expect). ``narrowed``: the tensors are already
    this rank's parts (the loader read them by :func:`weight_plan`); otherwise they are
    whole and cut here by the same plans. The vocabulary rows are zero-padded to
    ``vocab_shard`` either way.
    """
    start = layout.layers[0]
    for name, tensor in weights:
        if not layout.wants(name, model.tie_word_embeddings):
            continue
        if not narrowed:
            plan = weight_plan(name, tuple(tensor.shape), layout, model)
            if plan is not None:
                tensor = read_parts(tensor, plan)
        match = _LAYER.match(name)
        if match is not None:
            yield f"model.layers.{int(match.group(1)) - start}.{match.group(2)}", tensor
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            yield name, _pad_vocab_rows(tensor, layout)
        else:
            yield name, tensor


def weight_plan(
    name: str, shape: tuple[int, ...], layout: ShardLayout, model: ModelConfig
) -> ReadPlan | None:
    """Which parts of the checkpoint tensor ``name`` (of ``shape``, a Hugging Face name
    with its global layer index) this rank keeps: ``(dim, spans)``, the ``[start, end)``
    spans along ``dim`` joined in order; None: the whole tensor (replicated, or tp=1)."""
    if layout.tp_size == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        first = min(layout.vocab_start, shape[0])
        return 0, ((first, min(first + layout.vocab_shard, shape[0])),)
    match = _LAYER.match(name)
    if match is None:
        return None
    return _layer_plan(match.group(2).rsplit(".", 1)[0], layout, model)


def _span(span: tuple[int, int], unit: int, offset: int = 0) -> tuple[int, int]:
    return (offset + span[0] * unit, offset + span[1] * unit)


def _layer_plan(kind: str, layout: ShardLayout, model: ModelConfig) -> ReadPlan | None:
    d = model.head_dim
    if model.is_mla:  # DeepSeek's heads are not head_dim wide (head_dim is the latent's)
        mla = _mla_plan(kind, layout, model)
        if mla is not None:
            return mla
    if kind == "self_attn.q_proj":
        return 0, (_span(layout.q_heads, d),)
    if kind in ("self_attn.k_proj", "self_attn.v_proj"):
        return 0, (_span(layout.kv_heads, d),)
    if kind == "self_attn.qkv_proj":  # Phi-3's merged q|k|v
        q, kv = model.num_heads * d, model.num_kv_heads * d
        parts = (_span(layout.q_heads, d), _span(layout.kv_heads, d, q))
        return 0, (*parts, _span(layout.kv_heads, d, q + kv))
    if kind == "self_attn.o_proj":
        return 1, (_span(layout.q_heads, d),)
    if kind in ("mlp.gate_proj", "mlp.up_proj"):
        return 0, (layout.intermediate,)
    if kind == "mlp.gate_up_proj":  # Phi-3's merged gate|up
        return 0, (layout.intermediate, _span(layout.intermediate, 1, model.intermediate_size))
    if kind == "mlp.down_proj":
        return 1, (layout.intermediate,)
    expert, shared = _EXPERT.match(kind), _SHARED.match(kind)
    for match, span in ((expert, layout.moe_intermediate), (shared, layout.shared_intermediate)):
        if match is not None and match.group(1) in _COLUMN:
            return 0, (span,)
        if match is not None and match.group(1) in _ROW:
            return 1, (span,)
    # norms (q/k norms are per head dimension, the same on every rank), the routers,
    # Qwen2-MoE's shared-expert gate, DeepSeek's latent path (q_a, kv_a and their norms)
    return None


def _mla_plan(kind: str, layout: ShardLayout, model: ModelConfig) -> ReadPlan | None:
    """DeepSeek's per-head projections split by heads; None for any other tensor."""
    if kind in ("self_attn.q_proj", "self_attn.q_b_proj"):
        return 0, (_span(layout.q_heads, model.qk_nope_head_dim + model.qk_rope_head_dim),)
    if kind == "self_attn.kv_b_proj":
        return 0, (_span(layout.q_heads, model.qk_nope_head_dim + model.v_head_dim),)
    if kind == "self_attn.o_proj":
        return 1, (_span(layout.q_heads, model.v_head_dim),)
    return None


def _pad_vocab_rows(rows: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """This rank's rows of a [V, H] table, zero-padded to ``vocab_shard`` rows."""
    missing = layout.vocab_shard - rows.shape[0] if layout.tp_size > 1 else 0
    if missing:
        rows = torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
    return rows
