"""Which part of the model each rank holds: pure arithmetic, no torch.distributed.

Ranks are numbered ``rank = pp_rank * tp_size + tp_rank`` (as in vLLM): the ranks of
one pipeline stage are consecutive, and the driver rank (the one that returns logits to
the engine) is tp_rank 0 of the last stage.

Tensor parallelism splits each layer (Megatron style): q/k/v and gate/up by output
rows (column-parallel), o and down by input columns (row-parallel, summed by an
all-reduce), the embedding and lm_head by vocabulary rows. Pipeline parallelism splits
the layers into consecutive runs, one per stage.

Invariants of :class:`ShardLayout`:
- the stages' layer ranges tile ``[0, num_layers)`` in order, none empty;
- each rank's q heads are consecutive, ``num_heads / tp_size`` of them, and the kv heads
  it holds are exactly those its q heads read (GQA groups never straddle ranks);
- the vocabulary slices tile ``[0, tp_size * vocab_shard)``, which covers the vocabulary;
  rows past ``vocab_size`` are zero padding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvrun.errors import ConfigError
from kvrun.models.config import ModelConfig

__all__ = [
    "ParallelConfig",
    "ShardLayout",
    "check_heads",
    "partition_layers",
    "shard_weights",
]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")  # a decoder layer's tensor


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
        if model.intermediate_size % tp:
            raise ConfigError(
                f"the model's intermediate_size={model.intermediate_size} is not divisible "
                f"by tensor_parallel_size={tp}"
            )
        stages = partition_layers(model.num_layers, parallel.pipeline_parallel_size, partition)
        heads = model.num_heads // tp
        if model.num_kv_heads >= tp:
            kv = model.num_kv_heads // tp
            kv_heads = (tp_rank * kv, (tp_rank + 1) * kv)
        else:  # replicated: ranks sharing a kv head are those whose q heads read it
            head = tp_rank // (tp // model.num_kv_heads)
            kv_heads = (head, head + 1)
        inter = model.intermediate_size // tp
        shard = -(-model.vocab_size // tp)
        return cls(
            tp_rank=tp_rank,
            tp_size=tp,
            pp_rank=pp_rank,
            pp_size=parallel.pipeline_parallel_size,
            layers=stages[pp_rank],
            q_heads=(tp_rank * heads, (tp_rank + 1) * heads),
            kv_heads=kv_heads,
            intermediate=(tp_rank * inter, (tp_rank + 1) * inter),
            vocab_start=tp_rank * shard,
            vocab_shard=shard,
            vocab_size=model.vocab_size,
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
            num_layers=end - start,
            vocab_size=self.vocab_shard,
            layer_windows=model.layer_windows[start:end],
            moe_layers=model.moe_layers[start:end],
        )


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    layout: ShardLayout,
    model: ModelConfig,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's slices of a Llama-family checkpoint's (name, tensor) stream.

    Layer names are renumbered to the stage's own indices (``model.layers.<i - start>``);
    other stages' layers, and the embedding, final norm and lm_head where this stage
    does not hold them, are dropped. Everything else passes as it is (the loader then
    names any weight the model does not expect).
    """
    start = layout.layers[0]
    for name, tensor in weights:
        if not layout.wants(name, model.tie_word_embeddings):
            continue
        match = _LAYER.match(name)
        if match is not None:
            yield (
                f"model.layers.{int(match.group(1)) - start}.{match.group(2)}",
                _layer_slice(match.group(2), tensor, layout, model),
            )
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            yield name, _vocab_rows(tensor, layout)
        else:
            yield name, tensor


def _rows(tensor: torch.Tensor, span: tuple[int, int], unit: int) -> torch.Tensor:
    return tensor[span[0] * unit : span[1] * unit]


def _layer_slice(
    suffix: str, tensor: torch.Tensor, layout: ShardLayout, model: ModelConfig
) -> torch.Tensor:
    if layout.tp_size == 1:
        return tensor
    d = model.head_dim
    kind = suffix.rsplit(".", 1)[0]
    if kind == "self_attn.q_proj":
        return _rows(tensor, layout.q_heads, d)
    if kind in ("self_attn.k_proj", "self_attn.v_proj"):
        return _rows(tensor, layout.kv_heads, d)
    if kind == "self_attn.qkv_proj":  # Phi-3's merged q|k|v
        q, kv = model.num_heads * d, model.num_kv_heads * d
        parts = (tensor[:q], tensor[q : q + kv], tensor[q + kv :])
        return torch.cat(
            [
                _rows(parts[0], layout.q_heads, d),
                _rows(parts[1], layout.kv_heads, d),
                _rows(parts[2], layout.kv_heads, d),
            ]
        )
    if kind == "self_attn.o_proj":
        return tensor[:, layout.q_heads[0] * d : layout.q_heads[1] * d]
    if kind in ("mlp.gate_proj", "mlp.up_proj"):
        return _rows(tensor, layout.intermediate, 1)
    if kind == "mlp.gate_up_proj":  # Phi-3's merged gate|up
        gate, up = tensor.chunk(2)
        return torch.cat([_rows(gate, layout.intermediate, 1), _rows(up, layout.intermediate, 1)])
    if kind == "mlp.down_proj":
        return tensor[:, layout.intermediate[0] : layout.intermediate[1]]
    return tensor  # norms (q/k norms are per head dimension, the same on every rank)


def _vocab_rows(tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """This rank's rows of a [V, H] table, zero-padded to ``vocab_shard`` rows."""
    if layout.tp_size == 1:
        return tensor
    rows = tensor[layout.vocab_start : layout.vocab_start + layout.vocab_shard]
    missing = layout.vocab_shard - rows.shape[0]
    if missing:
        rows = torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
    return rows
