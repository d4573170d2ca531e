"""The OpenVINO whole-model executor: kvrun's scheduler drives a compiled paged graph.

Attention runs inside the compiled model (PagedAttentionExtension) against the block
tables kvrun's block manager chose; this module turns the core's flat batch into the
graph's paged inputs and owns the per-layer key/value cache tensors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvrun.platforms.base import KVCachePlan, ModelExecutor
from kvrun.scheduling.capacity import require_blocks

__all__ = ["CacheInput", "OpenvinoExecutor", "paged_inputs"]

logger = logging.getLogger(__name__)

# OpenVINO element type names -> the torch dtype a KVCachePlan reports.
_TORCH_DTYPES = {
    "u8": torch.uint8,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i8": torch.int8,
}
# The inference precision that keeps each engine dtype's numerics.
INFERENCE_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass(frozen=True)
class CacheInput:
    """One key_cache.N / value_cache.N input as the compiled model declares it."""

    name: str  # "key_cache.0"
    element_type: Any  # openvino.Type the plugin chose (u8 carries per-token scales)
    block_shape: tuple[int, ...]  # the shape after the leading num_blocks dimension

    @property
    def bytes_per_block(self) -> int:
        return math.prod(self.block_shape) * int(self.element_type.size)


def paged_inputs(
    input_ids: torch.Tensor,  # [T] int64
    positions: torch.Tensor,  # [T] int64
    meta: Any,  # kvrun.attention.AttentionMetadata
    logits_indices: torch.Tensor,  # [N] int64
) -> dict[str, np.ndarray]:
    """The paged graph's non-cache inputs for one step, from the core's flat batch.

    past_lens [B]: tokens already cached per sequence; subsequence_begins [B+1]: each
    sequence's first flat token; block_indices: each sequence's used blocks back to
    back, block_indices_begins [B+1] where each sequence's run starts.
    """
    seq_lens = list(meta.seq_lens_host)
    query_lens = list(meta.query_lens)
    tables = meta.block_tables.tolist()
    blocks: list[int] = []
    begins = [0]
    for table, seq_len in zip(tables, seq_lens, strict=True):
        used = -(-seq_len // meta.block_size)
        blocks.extend(table[:used])
        begins.append(len(blocks))
    return {
        "input_ids": input_ids.numpy(),
        "position_ids": positions.numpy(),
        "past_lens": np.array([s - q for s, q in zip(seq_lens, query_lens)], dtype=np.int32),
        "subsequence_begins": meta.query_start_loc.numpy().astype(np.int32),
        "block_indices": np.array(blocks, dtype=np.int32),
        "block_indices_begins": np.array(begins, dtype=np.int32),
        "max_context_len": np.array(max(seq_lens), dtype=np.int32),
        "logits_indices": logits_indices.numpy(),
    }


class OpenvinoExecutor(ModelExecutor):
    """A compiled paged model and its KV cache; see ModelExecutor for the invariants."""

    def __init__(
        self,
        compiled: Any,  # openvino.CompiledModel of the paged model
        budget: tuple[int, str],  # KV bytes and where that figure came from
        asked_precision: str | None,  # VLLM_OPENVINO_CPU_KV_CACHE_PRECISION
    ) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.budget = budget
        names = {n for port in compiled.inputs for n in port.get_names()}
        self.num_layers = sum(1 for n in names if n.startswith("key_cache."))
        self.caches: list[CacheInput] = []
        for i in range(self.num_layers):
            for kind in ("key_cache", "value_cache"):
                port = compiled.input(f"{kind}.{i}")
                shape = port.get_partial_shape()
                assert shape.rank.get_length() == 4 and shape[1:].is_static, shape
                dims = tuple(d.get_length() for d in list(shape)[1:])
                self.caches.append(CacheInput(f"{kind}.{i}", port.get_element_type(), dims))
        # value_cache is [blocks, kv_heads, block_size, head(+scales)]; key_cache rows
        # also hold u8 scales, so the block size is read from the value cache.
        self.block_size = self.caches[1].block_shape[1]
        got = self.caches[0].element_type.get_type_name()
        values = self.caches[1].element_type.get_type_name()
        if asked_precision is not None and got != asked_precision:
            # The CPU plugin accepts a precision it lacks and quietly picks another.
            logger.warning(
                "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION=%s was asked for, but the compiled "
                "model keeps its KV cache in %s",
                asked_precision,
                got,
            )
        # The plugin may keep keys and values in different precisions (KEY_/VALUE_CACHE_
        # PRECISION); the plan's dtype is the keys', its reason names both.
        self.cache_type_name = got if values == got else f"{got} keys, {values} values"
        self.cache_dtype = _TORCH_DTYPES[got]
        self.tensors: list[Any] = []

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        return sum(c.bytes_per_block for c in self.caches)

    def init_kv_cache(self, num_blocks: int | None, max_model_len: int) -> KVCachePlan:
        import openvino

        assert not self.tensors, "init_kv_cache is called once"
        budget, why = self.budget
        if num_blocks is None:
            num_blocks = budget // self.bytes_per_block
        else:
            budget, why = num_blocks * self.bytes_per_block, f"num_kv_blocks={num_blocks} asked for"
        require_blocks(
            num_blocks,
            block_size=self.block_size,
            max_model_len=max_model_len,
            holder=(
                f"the OpenVINO KV cache ({why}; {self.bytes_per_block} bytes a block in "
                f"{self.cache_type_name})"
            ),
            remedy="raise VLLM_OPENVINO_KVCACHE_SPACE or lower max_model_len",
        )
        for cache in self.caches:
            tensor = openvino.Tensor(cache.element_type, [num_blocks, *cache.block_shape])
            # Bound once: a cache passed per call through infer()'s inputs is copied in,
            # and the graph's writes to the copy are lost.
            self.request.set_tensor(cache.name, tensor)
            self.tensors.append(tensor)
        per_layer = sum(math.prod(c.block_shape) for c in self.caches) // self.num_layers
        return KVCachePlan(
            num_blocks=num_blocks,
            block_size=self.block_size,
            dtype=self.cache_dtype,
            layer_shape=(num_blocks, per_layer),
            num_layers=self.num_layers,
            budget_bytes=budget,
            reason=f"{why}; OpenVINO cache precision {self.cache_type_name}",
        )

    def execute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: Any,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        assert self.tensors, "init_kv_cache runs before the first step"
        for name, value in paged_inputs(input_ids, positions, meta, logits_indices).items():
            self.request.set_tensor(name, _tensor(value))
        self.request.infer()
        logits = self.request.get_tensor("logits").data
        return torch.from_numpy(np.array(logits, dtype=np.float32, copy=True))


def _tensor(value: np.ndarray) -> Any:
    import openvino

    # Every array here is freshly built, so contiguous; np.ascontiguousarray would
    # turn the 0-d max_context_len into shape (1,), which the graph refuses.
    return openvino.Tensor(value)
