"""kvrun-cuda device-neutral arithmetic: profiled budget, alignment, graph sizes, page tables."""

from __future__ import annotations

import pytest
import torch

from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.platforms import KVCacheRequest
from kvrun_cuda.cuda_graphs import GraphBuffers, capture_sizes, eager_reason, padded_size
from kvrun_cuda.devices import device_index, visible_devices
from kvrun_cuda.flashinfer_attn import paged_kv_indices
from kvrun_cuda.memory import (
    MemorySnapshot,
    aligned_entry_elems,
    aligned_latent_request,
    profiled_kv_budget,
)
from kvrun_cuda.platform import CudaPlatform

GiB = 1 << 30


def test_budget_is_the_share_minus_the_profiled_peak() -> None:
    snapshot = MemorySnapshot(
        total=80 * GiB, free=70 * GiB, torch_peak=12 * GiB, torch_reserved=10 * GiB
    )
    budget, reason = profiled_kv_budget(snapshot, 0.9, "cuda:0")
    assert budget == int(80 * GiB * 0.9) - 12 * GiB
    assert reason == (
        "0.9 of 80.00 GiB on cuda:0 minus a profiled peak of 12.00 GiB (weights and "
        "activations at the largest batch)"
    )


def test_memory_held_outside_torch_counts_against_the_share() -> None:
    # 80 GiB total, 40 free, torch holds 10: 30 GiB belong to others (another engine).
    snapshot = MemorySnapshot(
        total=80 * GiB, free=40 * GiB, torch_peak=8 * GiB, torch_reserved=10 * GiB
    )
    budget, reason = profiled_kv_budget(snapshot, 0.5, "cuda:1")
    assert budget == 40 * GiB - 8 * GiB - 30 * GiB
    assert reason.endswith(" and 30.00 GiB held outside this process's torch allocator")
    full = MemorySnapshot(total=80 * GiB, free=1 * GiB, torch_peak=8 * GiB, torch_reserved=8 * GiB)
    assert profiled_kv_budget(full, 0.5, "cuda:0")[0] == 0


def test_utilization_out_of_range() -> None:
    snapshot = MemorySnapshot(total=GiB, free=GiB, torch_peak=0, torch_reserved=0)
    with pytest.raises(ConfigError) as err:
        profiled_kv_budget(snapshot, 1.5, "cuda:0")
    assert str(err.value) == (
        "gpu_memory_utilization=1.5 is out of range; accepted: 0 < value <= 1"
    )


def test_kv_entry_alignment() -> None:
    # An MLA latent entry: 512 + 64 bf16 elements (1152 bytes) pads to 1280 bytes.
    assert aligned_entry_elems(576, 2, enabled=True) == 640
    assert aligned_entry_elems(576, 2, enabled=False) == 576
    assert aligned_entry_elems(128, 2, enabled=True) == 128
    assert aligned_entry_elems(100, 1, enabled=True) == 256


def test_capture_sizes_and_padding() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(4) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    sizes = capture_sizes(20)
    assert [padded_size(n, sizes) for n in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]


def test_graph_buffers_describe_one_token_per_request() -> None:
    buffers = GraphBuffers.allocate(max_batch=4, max_blocks=3, device=torch.device("cpu"))
    meta = buffers.meta(size=2, block_size=16, max_seq_len=48)
    assert meta.query_start_loc.tolist() == [0, 1, 2]
    assert (meta.num_tokens, meta.query_lens, meta.is_all_decode) == (2, [1, 1], True)
    assert tuple(meta.block_tables.shape) == (2, 3)
    # Views, not copies: a replay's copies into the buffers reach the captured graph.
    assert meta.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()


def test_flashinfer_page_table() -> None:
    tables = torch.tensor([[5, 2, 9], [7, 0, 0], [3, 4, 0]], dtype=torch.int32)
    indptr, indices, last = paged_kv_indices(tables, [33, 16, 17], block_size=16)
    assert indptr.tolist() == [0, 3, 4, 6]
    assert indices.tolist() == [5, 2, 9, 7, 3, 4]
    assert last.tolist() == [1, 16, 1]
    assert indices.dtype == torch.int32


def test_device_index_from_local_rank_and_visible_devices() -> None:
    assert visible_devices(None) is None
    assert visible_devices("0, 2,") == ["0", "2"]
    assert device_index(1, "0,2", 2) == 1
    assert device_index(0, None, 8) == 0
    with pytest.raises(ConfigError) as err:
        device_index(2, "0,2", 2)
    assert str(err.value) == (
        "LOCAL_RANK=2 needs GPU index 2, but CUDA_VISIBLE_DEVICES='0,2' leaves 2 visible "
        "GPU(s) (indices 0..1); lower LOCAL_RANK or show more GPUs"
    )
    with pytest.raises(ConfigError) as err:
        device_index(0, "", 0)
    assert str(err.value) == (
        "CUDA_VISIBLE_DEVICES='' hides every GPU; unset it or list the GPUs this process "
        "may use, e.g. CUDA_VISIBLE_DEVICES=0,1"
    )


def test_when_decode_steps_run_eagerly() -> None:
    assert eager_reason(enforce_eager=False, attention_backend="TRITON_ATTN") is None
    assert eager_reason(enforce_eager=True, attention_backend="TRITON_ATTN") == "enforce_eager=True"
    assert eager_reason(enforce_eager=False, attention_backend="FLASHINFER") == (
        "attention backend FLASHINFER cannot be captured in a CUDA graph (capturable: TRITON_ATTN)"
    )
    # The engine names an fp8 cache's Triton backend TRITON_ATTN too; the cache dtype decides.
    for fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        assert eager_reason(False, "TRITON_ATTN", fp8) == (
            f"the KV cache is fp8 ({str(fp8).removeprefix('torch.')}), whose per-layer scales "
            "are measured with a host read on each layer's first write, which a CUDA graph "
            "cannot capture"
        )
    assert eager_reason(False, "TRITON_ATTN", torch.float16) is None


def _latent_request(dtype: torch.dtype, planes: int = 1) -> KVCacheRequest:
    # DeepSeek-V2's latent entry: one KV head of kv_lora_rank 512 + rope 64
    return KVCacheRequest(
        num_layers=2,
        num_kv_heads=1,
        head_dim=576,
        block_size=16,
        dtype=dtype,
        max_model_len=64,
        layer_shape=lambda n: (planes, n, 16, 1, 576),
        kv_planes=planes,
    )


@pytest.mark.parametrize(("dtype", "width"), [(torch.bfloat16, 640), (torch.float8_e4m3fn, 768)])
def test_latent_entries_are_padded_to_256_bytes_when_asked(dtype: torch.dtype, width: int) -> None:
    request = _latent_request(dtype)
    budgeted, padding = aligned_latent_request(request, enabled=True)
    assert (budgeted.head_dim, padding) == (width, width - 576)
    assert budgeted.bytes_per_token == 2 * width * dtype.itemsize  # what blocks are budgeted at
    assert aligned_latent_request(request, enabled=False) == (request, 0)
    two_planes = _latent_request(dtype, planes=2)  # not MLA's single plane: unchanged
    assert aligned_latent_request(two_planes, enabled=True) == (two_planes, 0)


class _HostCuda(CudaPlatform):
    """The cuda platform's planning and allocation with the device facts a CPU lacks:
    a fixed budget and host memory."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        return 1 << 20, "1 MiB"


@pytest.mark.parametrize("aligned", ["1", "0"])
def test_the_cuda_plan_budgets_padded_entries_and_allocates_views(aligned: str) -> None:
    platform = _HostCuda(read_env({"VLLM_CUDA_MEM_ALIGN_KV_CACHE": aligned}))
    request = _latent_request(torch.bfloat16)
    plan = platform.plan_kv_cache(request)
    width = 640 if aligned == "1" else 576
    assert plan.num_blocks == (1 << 20) // (16 * 2 * width * 2)
    assert plan.layer_shape == (1, plan.num_blocks, 16, 1, 576)
    assert plan.entry_padding == width - 576
    assert plan.total_bytes == 2 * plan.num_blocks * 16 * width * 2
    assert ("VLLM_CUDA_MEM_ALIGN_KV_CACHE" in plan.reason) == (aligned == "1")
    caches = platform.allocate_kv_cache(plan, 2)
    for cache in caches:
        assert cache.shape == plan.layer_shape and cache.stride()[-2] == width
        assert cache.stride()[-1] == 1 and not cache.any()
    assert caches[0].untyped_storage().data_ptr() != caches[1].untyped_storage().data_ptr()
