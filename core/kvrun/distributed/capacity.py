"""Capacity arithmetic for a tensor/pipeline-parallel layout: bytes per GPU, per token.

The same formulas size a real engine (each rank's KV bytes per token decide how many
blocks its share of the budget holds) and the capacity plan on paper in
docs/distributed.md (a model no single GPU holds). Pure arithmetic over a
:class:`ModelShape`; nothing here allocates or talks to a device.

Conventions (decoder-only transformer, Megatron-style tensor parallelism):
- every layer has q/k/v/o projections and a gated MLP (gate, up, down), two RMSNorms;
- tensor parallelism splits heads and the MLP's intermediate dimension over
  ``tp`` ranks; KV heads are replicated when there are fewer than ``tp``;
- each layer does two all-reduces of the hidden state per token (after the attention
  output and after the MLP down projection); a ring all-reduce of ``S`` bytes moves
  ``2 (tp - 1) / tp * S`` bytes in and out of every rank;
- pipeline stages hold consecutive layers (:func:`~kvrun.distributed.parallel.partition_layers`);
  the first also holds the embedding, the last the final norm and lm_head, and each
  boundary passes the hidden state and the residual forward once per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.distributed.parallel import partition_layers

__all__ = [
    "ModelShape",
    "allreduce_bytes_per_token",
    "kv_bytes_per_token",
    "kv_heads_per_rank",
    "parameter_count",
    "pipeline_bytes_per_token",
    "stage_parameter_count",
]


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a decoder's weights, KV cache and traffic."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False

    def layer_parameters(self) -> int:
        """Weights of one decoder layer (projections and its two norms)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h


def parameter_count(shape: ModelShape) -> int:
    """Every weight of the model: layers, embedding, final norm and an untied lm_head."""
    embedding = shape.vocab_size * shape.hidden_size
    head = 0 if shape.tied_embeddings else embedding
    return shape.num_layers * shape.layer_parameters() + embedding + head + shape.hidden_size


def stage_parameter_count(
    shape: ModelShape, tp: int, pp: int, stage: int, partition: list[int] | None = None
) -> int:
    """Weights one rank of pipeline stage ``stage`` holds (its layers' shard, plus the
    embedding's and lm_head's vocabulary slices where that stage holds them; norms are
    replicated). KV heads replicated over ranks count once per rank."""
    start, end = partition_layers(shape.num_layers, pp, partition)[stage]
    h, d = shape.hidden_size, shape.head_dim
    q_and_o = 2 * h * (shape.num_heads // tp) * d
    k_and_v = 2 * h * kv_heads_per_rank(shape, tp) * d
    mlp = 3 * h * (shape.intermediate_size // tp)
    per_layer = q_and_o + k_and_v + mlp + 2 * h
    vocab_slice = -(-shape.vocab_size // tp) * h
    total = (end - start) * per_layer
    if stage == 0:
        total += vocab_slice
    if stage == pp - 1:
        total += h  # the final norm
        if not shape.tied_embeddings or pp > 1:
            total += vocab_slice  # lm_head (a tied head is a second copy on another stage)
    return total


def kv_heads_per_rank(shape: ModelShape, tp: int) -> int:
    """KV heads each tensor-parallel rank caches: split when ``tp`` divides them,
    one (replicated) when there are fewer heads than ranks."""
    return max(1, shape.num_kv_heads // tp)


def kv_bytes_per_token(
    shape: ModelShape, tp: int, num_layers: int | None = None, kv_bytes: int = 2
) -> int:
    """KV-cache bytes one token costs on one rank holding ``num_layers`` layers
    (default all): key and value, every layer, the rank's KV heads."""
    layers = shape.num_layers if num_layers is None else num_layers
    return 2 * layers * kv_heads_per_rank(shape, tp) * shape.head_dim * kv_bytes


def allreduce_bytes_per_token(
    shape: ModelShape, tp: int, num_layers: int | None = None, act_bytes: int = 2
) -> int:
    """Bytes a rank sends (and receives) per token for the all-reduces of ``num_layers``
    layers (default all) under a ring all-reduce; 0 without tensor parallelism."""
    if tp == 1:
        return 0
    layers = shape.num_layers if num_layers is None else num_layers
    message = shape.hidden_size * act_bytes
    return 2 * layers * message * 2 * (tp - 1) // tp


def pipeline_bytes_per_token(shape: ModelShape, act_bytes: int = 2) -> int:
    """Bytes one stage boundary passes forward per token: hidden state and residual."""
    return 2 * shape.hidden_size * act_bytes
