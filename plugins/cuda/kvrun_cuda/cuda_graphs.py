"""CUDA graphs for decode steps: capture once per padded batch size, replay after.

A decode step launches hundreds of small kernels; replaying a captured graph removes
their launch cost. Batches are padded up to the nearest captured size; padding rows
decode a dummy token whose K/V goes to ``pad_slot``, a cache slot the engine never
hands to a request. Anything that is not an all-decode batch within the largest
size runs eagerly, and so does everything when ``enforce_eager`` is set, the
attention backend reads host-side lists (which a graph would freeze at capture) or
the KV cache is fp8 (its scales are measured on the host from the first real batch).

Not yet run on a GPU (this plugin's README says what is verified); the size
arithmetic is pure and tested on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun_cuda.fp8 import FP8_KV_DTYPES

__all__ = [
    "GRAPH_SAFE_BACKENDS",
    "DecodeGraphRunner",
    "Forward",
    "GraphBuffers",
    "capture_sizes",
    "eager_reason",
    "padded_size",
]

# The model's forward as the runner calls it: (input_ids [N], positions [N], meta) -> [N, H].
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


# Backends whose forward reads no host-side list and no device value back to the host:
# TRITON_ATTN takes seq_lens and block tables as device tensors. FLASHINFER plans on
# the host from seq_lens_host; REFERENCE loops over host lists.
GRAPH_SAFE_BACKENDS = frozenset({"TRITON_ATTN"})


def eager_reason(
    enforce_eager: bool, attention_backend: str, kv_cache_dtype: torch.dtype | None = None
) -> str | None:
    """Why decode steps must run eagerly, or None when they may be captured.

    ``kv_cache_dtype`` is the engine config's (None = the model dtype). An fp8 cache
    stays eager whichever backend reads it: each layer's scales are measured with a host
    read on its first write, which capture cannot do, and the capture's warm-up on
    padding tokens would be that first write.
    """
    if enforce_eager:
        return "enforce_eager=True"
    if kv_cache_dtype in FP8_KV_DTYPES:
        return (
            f"the KV cache is fp8 ({str(kv_cache_dtype).removeprefix('torch.')}), whose "
            "per-layer scales are measured with a host read on each layer's first write, "
            "which a CUDA graph cannot capture"
        )
    if attention_backend not in GRAPH_SAFE_BACKENDS:
        safe = ", ".join(sorted(GRAPH_SAFE_BACKENDS))
        return (
            f"attention backend {attention_backend} cannot be captured in a CUDA graph "
            f"(capturable: {safe})"
        )
    return None


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The captured size a batch of ``num_seqs`` decodes replays at; None: run eagerly."""
    return next((s for s in sizes if s >= num_seqs), None)


@dataclass
class GraphBuffers:
    """Static inputs the graphs read; a replay copies the live batch into their heads."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    seq_lens: torch.Tensor  # [max_batch] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    query_start_loc: torch.Tensor  # [max_batch + 1] int32: 0, 1, 2, ... (one token each)

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> GraphBuffers:
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(max_batch, dtype=torch.int64),
            positions=zeros(max_batch, dtype=torch.int64),
            slot_mapping=zeros(max_batch, dtype=torch.int64),
            seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
            block_tables=zeros(max_batch, max_blocks, dtype=torch.int32),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
        )

    def meta(self, size: int, block_size: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_tokens=size,
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            query_lens=[1] * size,
            # Frozen at capture: only backends that ignore host lists may be captured.
            seq_lens_host=[max_seq_len] * size,
            block_size=block_size,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )


class DecodeGraphRunner:
    """Replays captured decode graphs; :meth:`run` returns None where eager must run."""

    def __init__(
        self,
        forward: Forward,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        pad_slot: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.sizes = capture_sizes(max_num_seqs)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.pad_slot = pad_slot
        max_blocks = -(-max_model_len // block_size)
        self.buffers = GraphBuffers.allocate(self.sizes[-1], max_blocks, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # one memory pool handle shared by every graph

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its pool."""
        self.buffers.slot_mapping.fill_(self.pad_slot)
        for size in reversed(self.sizes):
            meta = self.buffers.meta(size, self.block_size, self.max_model_len)
            ids, pos = self.buffers.input_ids[:size], self.buffers.positions[:size]
            stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: lazy inits must not be captured
                self.forward(ids, pos, meta)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(ids, pos, meta)
            self.pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """The hidden states of an all-decode batch by replay; None: not capturable."""
        if not meta.is_all_decode:
            return None
        n = meta.num_seqs
        size = padded_size(n, self.sizes)
        if size is None or size not in self.graphs:
            return None
        b = self.buffers
        b.input_ids[:n].copy_(input_ids)
        b.positions[:n].copy_(positions)
        b.slot_mapping[:n].copy_(meta.slot_mapping)
        b.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        b.block_tables[:n, :width].copy_(meta.block_tables)
        # Padding rows: a one-token context at the reserved slot.
        b.input_ids[n:size].zero_()
        b.positions[n:size].zero_()
        b.slot_mapping[n:size].fill_(self.pad_slot)
        b.seq_lens[n:size].fill_(1)
        b.block_tables[n:size, 0].fill_(self.pad_slot // self.block_size)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
