"""TORCH_SDPA: paged attention on torch's scaled_dot_product_attention.

Cache layout ``[2, Hk, num_blocks, block_size, D]`` (keys, values): head-major, so
gathering a batch's blocks with one ``index_select`` on dim 1 yields ``[Hk, n, S, D]``
K/V that SDPA reads without a further copy. Each step gathers only the blocks named
by the block tables, never concatenates a sequence's history.

Given the native kernels (:mod:`kvrun_cpu.native`), the cache write, every decode and
every prefill (float32, bfloat16, float16) run there: the kernels skip the gather and
read the cache in place, and a prefill attends each query exactly as decode would, so
a prompt's bits do not depend on its chunks, its batch or a prefix-cache hit (what
lets bfloat16 be the cpu default). Without them prefills run on SDPA. As in vLLM's
CPU backend of the same name.
"""

from __future__ import annotations

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.ops import reference
from kvrun_cpu.attention.kernels import Workspace, decode_attention, prefill_attention
from kvrun_cpu.attention.native import decode_batch, prefill_batch, runs_natively
from kvrun_cpu.attention.plan import BatchPlan, build_plan
from kvrun_cpu.native import NativeKernels

__all__ = ["TorchSdpaAttention", "write_kv_head_major"]

_KEYS, _VALUES = 0, 1  # workspace slots


def write_kv_head_major(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [Hk, num_blocks, block_size, D]
    value_cache: torch.Tensor,  # [Hk, num_blocks, block_size, D]
    slot_mapping: torch.Tensor,  # [T] int64, block_id * block_size + offset
) -> None:
    """reshape_and_cache for the head-major layout, in place."""
    num_kv_heads, num_blocks, block_size, head_dim = key_cache.shape
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    if key.dtype != key_cache.dtype:
        key = key.to(key_cache.dtype)
    if value.dtype != value_cache.dtype:
        value = value.to(value_cache.dtype)
    rows = num_blocks * block_size
    key_cache.view(num_kv_heads, rows, head_dim).index_copy_(1, slots, key.transpose(0, 1))
    value_cache.view(num_kv_heads, rows, head_dim).index_copy_(1, slots, value.transpose(0, 1))


class TorchSdpaAttention(AttentionBackend):
    """Batched decode groups and per-request prefills, both on SDPA.

    One instance may serve every layer of a model (the CPU platform hands out one per
    layer spec): the batch plan is built once per step's metadata and the gather
    buffers are shared. Layers must run one after another, not concurrently.
    """

    name = "TORCH_SDPA"
    # Layers with a sliding window or soft-capped scores (Gemma) run the core's gathering
    # reference op over this cache (float32 scores): correct, not fast. The latent cache
    # (``[1, Hk, num_blocks, block_size, D]``) runs every path, native kernels included.
    features = frozenset({"sliding_window", "logit_softcap", "latent_kv"})

    def __init__(self, spec: AttentionLayerSpec, native: NativeKernels | None = None) -> None:
        super().__init__(spec)
        self.native = native
        self._workspace = Workspace()
        # The last plan and what it was built from: the host lengths and a copy of the
        # block tables (compared by value: a runner may refill one tables buffer in place,
        # and tensors made under inference_mode carry no version counter to check).
        self._plan_from: tuple[tuple[int, ...], torch.Tensor, int, bool] | None = None
        self._plan: BatchPlan | None = None

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    @staticmethod
    def latent_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (1, num_kv_heads, num_blocks, block_size, head_dim)

    def plan(self, meta: AttentionMetadata, one_decode_batch: bool = False) -> BatchPlan:
        """The step's plan, rebuilt only when the metadata (or its block tables) changed;
        ``one_decode_batch``: decodes and prefills each as one batch for the kernels."""
        tables = meta.block_tables
        lens = (*meta.query_lens, -1, *meta.seq_lens_host)
        last = self._plan_from
        if (
            self._plan is None
            or last is None
            or last[0] != lens
            or last[1].shape != tables.shape
            or not torch.equal(last[1], tables)
            or last[2] != meta.block_size
            or last[3] != one_decode_batch
        ):
            self._plan = build_plan(
                meta.query_lens,
                meta.seq_lens_host,
                tables,
                meta.block_size,
                one_decode_batch=one_decode_batch,
                one_prefill_batch=one_decode_batch,
            )
            self._plan_from = (lens, tables.clone(), meta.block_size, one_decode_batch)
        return self._plan

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        latent = self.spec.latent_value_dim
        if latent is None:
            return self._attend(query, key, value, kv_cache[0], kv_cache[1], meta)
        # The latent cache: one plane read as both keys and values (the kernels take the
        # same tensor twice), and the output's first latent columns are the values'.
        plane = kv_cache[0]
        return self._attend(query, key, key, plane, plane, meta)[..., :latent].contiguous()

    def _needs_reference(self, meta: AttentionMetadata) -> bool:
        """Soft-capping, or a window that masks something this step: the gathering
        reference op. A window no context reaches past (every seq_len <= the window, so
        no block was released either) masks nothing: the fast paths are exact there."""
        spec = self.spec
        if spec.logit_softcap is not None:
            return True
        return spec.sliding_window is not None and meta.max_seq_len > spec.sliding_window

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,  # [Hk, NB, bs, D]
        value_cache: torch.Tensor,  # the same shape; may be key_cache itself (latent)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        native = runs_natively(self.native, query, key_cache)
        if native and key.dtype == key_cache.dtype and meta.slot_mapping.dtype == torch.int64:
            assert self.native is not None
            self.native.write_kv(key, value, key_cache, value_cache, meta.slot_mapping)
        else:
            write_kv_head_major(key, value, key_cache, value_cache, meta.slot_mapping)
        if self._needs_reference(meta):
            return reference.paged_attention(
                query,
                key_cache.permute(1, 2, 0, 3),  # [NB, bs, Hk, D], the reference's layout
                value_cache.permute(1, 2, 0, 3),
                meta.block_tables,
                meta.seq_lens_host,
                meta.query_lens,
                self.spec.scale,
                sliding_window=self.spec.sliding_window,
                logit_softcap=self.spec.logit_softcap,
            )
        plan = self.plan(meta, one_decode_batch=native)
        num_kv_heads, _, block_size, head_dim = key_cache.shape
        scale = self.spec.scale
        out = torch.empty_like(query)
        if plan.decode_batch is not None:
            assert self.native is not None
            batch = plan.decode_batch
            decode_batch(self.native, query, key_cache, value_cache, batch, scale, out)
        if plan.prefill_batch is not None:
            assert self.native is not None
            prefill = plan.prefill_batch
            prefill_batch(self.native, query, key_cache, value_cache, prefill, scale, out)
        for group in plan.decodes:
            n, width = group.num_seqs, group.num_blocks * block_size
            shape = (num_kv_heads, n * group.num_blocks, block_size, head_dim)
            ws_k = self._workspace.take(_KEYS, shape, key_cache.dtype, key_cache.device)
            ws_v = self._workspace.take(_VALUES, shape, value_cache.dtype, value_cache.device)
            torch.index_select(key_cache, 1, group.block_ids, out=ws_k)
            torch.index_select(value_cache, 1, group.block_ids, out=ws_v)
            # [Hk, n, width, D] -> [n, Hk, span, D]: a view, no copy.
            k = ws_k.view(num_kv_heads, n, width, head_dim)[:, :, : group.span].transpose(0, 1)
            v = ws_v.view(num_kv_heads, n, width, head_dim)[:, :, : group.span].transpose(0, 1)
            if isinstance(group.tokens, slice):
                out[group.tokens] = decode_attention(query[group.tokens], k, v, group.mask, scale)
            else:
                q = query.index_select(0, group.tokens)
                out.index_copy_(0, group.tokens, decode_attention(q, k, v, group.mask, scale))
        for seq in plan.prefills:
            if seq.cached_len == 0:
                # Nothing cached before this step: the new keys are the whole context.
                # Rounded to the cache dtype, as a reader of the cache would see them.
                k = key[seq.tokens].to(key_cache.dtype).transpose(0, 1)
                v = value[seq.tokens].to(value_cache.dtype).transpose(0, 1)
            else:
                blocks = seq.block_ids
                k = key_cache.index_select(1, blocks).view(num_kv_heads, -1, head_dim)
                v = value_cache.index_select(1, blocks).view(num_kv_heads, -1, head_dim)
                k, v = k[:, : seq.seq_len], v[:, : seq.seq_len]
            out[seq.tokens] = prefill_attention(query[seq.tokens], k, v, seq.mask, scale)
        return out
