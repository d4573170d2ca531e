"""FLASHINFER: attention over the paged KV cache with flashinfer-python's wrappers.

Written against FlashInfer's documented paged-KV API (``BatchDecodeWithPagedKVCacheWrapper``
and ``BatchPrefillWithPagedKVCacheWrapper``: ``plan`` once per step, ``run`` per layer).
Not yet run on a GPU: see the plugin README for what is verified.
"""

from __future__ import annotations

from typing import Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata

__all__ = ["FlashInferAttention", "paged_kv_indices"]

# FlashInfer's examples size the scratch space its split-k schedules use at 128 MiB.
WORKSPACE_BYTES = 128 << 20
# Grouped-query decode with this many query heads per KV head runs faster on tensor cores.
TENSOR_CORE_GROUP = 4


def paged_kv_indices(
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: list[int],  # [B] context length after this step
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page table: (indptr [B+1], indices [sum pages], last_page_len [B]).

    Request ``i`` owns pages ``indices[indptr[i]:indptr[i+1]]``; its last page holds
    ``last_page_len[i]`` tokens (1..block_size). Pure tensor code, so it is tested on CPU.
    """
    device = block_tables.device
    pages = [-(-n // block_size) for n in seq_lens]
    counts = torch.tensor(pages, dtype=torch.int32, device=device)
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=device)
    indptr[1:] = torch.cumsum(counts, 0)
    columns = torch.arange(block_tables.shape[1], device=device)
    indices = block_tables[columns.unsqueeze(0) < counts.unsqueeze(1)].to(torch.int32)
    last = [n - (p - 1) * block_size for n, p in zip(seq_lens, pages)]
    last_page_len = torch.tensor(last, dtype=torch.int32, device=device)
    return indptr, indices, last_page_len


class FlashInferAttention(AttentionBackend):
    """Decode batches through the decode wrapper, anything with a prefill through prefill.

    Cache layout (FlashInfer's "NHD" with keys and values interleaved per page):
    ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``. One instance serves every
    layer, so the page table is planned once per step (the first layer) and reused.
    """

    name = "FLASHINFER"

    def __init__(self, spec: AttentionLayerSpec, force_tensor_cores: bool = False) -> None:
        super().__init__(spec)
        group = spec.num_heads // spec.num_kv_heads
        # VLLM_FLASHINFER_FORCE_TENSOR_CORES overrides the group-size heuristic.
        self.use_tensor_cores = force_tensor_cores or group >= TENSOR_CORE_GROUP
        self._wrappers: dict[str, Any] = {}
        self._planned_for: AttentionMetadata | None = None
        self._planned_kind = ""

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_dim)

    def _wrapper(self, kind: str, device: torch.device) -> Any:
        import flashinfer

        if kind not in self._wrappers:
            workspace = self._wrappers.get("workspace")
            if workspace is None:
                workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
                self._wrappers["workspace"] = workspace
            if kind == "decode":
                self._wrappers[kind] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=self.use_tensor_cores
                )
            else:
                self._wrappers[kind] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    workspace, "NHD"
                )
        return self._wrappers[kind]

    def _plan(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> str:
        kind = "decode" if meta.is_all_decode else "prefill"
        if self._planned_for is meta and self._planned_kind == kind:
            return kind
        spec = self.spec
        indptr, indices, last_len = paged_kv_indices(
            meta.block_tables, meta.seq_lens_host, meta.block_size
        )
        wrapper = self._wrapper(kind, query.device)
        if kind == "decode":
            wrapper.plan(
                indptr,
                indices,
                last_len,
                spec.num_heads,
                spec.num_kv_heads,
                spec.head_dim,
                meta.block_size,
                pos_encoding_mode="NONE",  # the model applies rotary embeddings itself
                q_data_type=query.dtype,
                kv_data_type=kv_cache.dtype,
                sm_scale=spec.scale,
            )
        else:
            wrapper.plan(
                meta.query_start_loc,
                indptr,
                indices,
                last_len,
                spec.num_heads,
                spec.num_kv_heads,
                spec.head_dim,
                meta.block_size,
                causal=True,  # bottom-right aligned: new tokens end each request's context
                sm_scale=spec.scale,
                q_data_type=query.dtype,
                kv_data_type=kv_cache.dtype,
            )
        self._planned_for, self._planned_kind = meta, kind
        return kind

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        slots = meta.slot_mapping
        blocks, offsets = slots // meta.block_size, slots % meta.block_size
        kv_cache[blocks, 0, offsets] = key.to(kv_cache.dtype)
        kv_cache[blocks, 1, offsets] = value.to(kv_cache.dtype)
        kind = self._plan(query, kv_cache, meta)
        out: torch.Tensor = self._wrappers[kind].run(query.contiguous(), kv_cache)
        return out
