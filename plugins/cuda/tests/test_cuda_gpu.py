"""kvrun-cuda on a real NVIDIA GPU: backends against the reference, graphs, profiling.

Every test here skips without a GPU (and the library tests without their package);
none has run yet: see the plugin README for what is verified.
"""

from __future__ import annotations

import pytest
import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.engine.batch import build_batch
from kvrun.envs import read_env
from kvrun.platforms import KVCacheRequest
from kvrun.scheduling.output import ScheduledChunk
from kvrun_cuda.cuda_graphs import DecodeGraphRunner
from kvrun_cuda.platform import CudaPlatform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs an NVIDIA GPU: torch.cuda.is_available() is False here",
    ),
]

SPEC = AttentionLayerSpec(num_heads=8, num_kv_heads=2, head_dim=64, scale=0.125)
BLOCK = 16
STEPS = [
    [
        ScheduledChunk("a", list(range(40)), 0, [3, 5, 7], True, True),
        ScheduledChunk("b", list(range(9)), 0, [1], True, True),
    ],
    [
        ScheduledChunk("a", [0], 40, [3, 5, 7], True, False),
        ScheduledChunk("b", [0], 9, [1], True, False),
    ],
]


def run_against_reference(backend: AttentionBackend) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    num_blocks = 8
    cache = torch.zeros(
        backend.kv_cache_shape(num_blocks, BLOCK, SPEC.num_kv_heads, SPEC.head_dim),
        dtype=torch.float16,
        device=device,
    )
    ref_cache = torch.zeros(
        (2, num_blocks, BLOCK, SPEC.num_kv_heads, SPEC.head_dim), dtype=torch.float16, device=device
    )
    ref = ReferenceAttention(SPEC)
    for chunks in STEPS:
        meta = build_batch(chunks, BLOCK, device).meta
        t = meta.num_tokens
        q = torch.randn(t, SPEC.num_heads, SPEC.head_dim, dtype=torch.float16, device=device)
        k = torch.randn(t, SPEC.num_kv_heads, SPEC.head_dim, dtype=torch.float16, device=device)
        v = torch.randn_like(k)
        got = backend.forward(q, k, v, cache, meta)
        want = ref.forward(q, k, v, ref_cache, meta)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_flashinfer_matches_the_reference() -> None:
    pytest.importorskip("flashinfer")
    from kvrun_cuda.flashinfer_attn import FlashInferAttention

    run_against_reference(FlashInferAttention(SPEC))
    run_against_reference(FlashInferAttention(SPEC, force_tensor_cores=True))


def test_xformers_matches_the_reference() -> None:
    pytest.importorskip("xformers")
    from kvrun_cuda.xformers_attn import XFormersAttention

    run_against_reference(XFormersAttention(SPEC))


def test_decode_graph_replay_equals_eager() -> None:
    device = torch.device("cuda")
    weight = torch.randn(100, 32, device=device)

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: object) -> torch.Tensor:
        return weight[ids] * (pos.unsqueeze(1) + 1).float()

    runner = DecodeGraphRunner(forward, 8, 64, BLOCK, pad_slot=0, device=device)
    runner.capture_all()
    chunks = [ScheduledChunk(r, [i + 3], 5 + i, [2], True, False) for i, r in enumerate("abc")]
    batch = build_batch(chunks, BLOCK, device)
    replayed = runner.run(batch.input_ids, batch.positions, batch.meta)
    assert replayed is not None
    torch.testing.assert_close(replayed, forward(batch.input_ids, batch.positions, batch.meta))
    prefill = build_batch([ScheduledChunk("p", [1, 2], 0, [4], True, True)], BLOCK, device)
    assert runner.run(prefill.input_ids, prefill.positions, prefill.meta) is None


def test_profiled_budget_counts_the_dummy_forward() -> None:
    platform = CudaPlatform(read_env({}))
    peak = platform.measure_peak_memory(
        lambda: torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(1)
    )
    assert peak >= 256 << 20
    request = KVCacheRequest(
        num_layers=2,
        num_kv_heads=2,
        head_dim=64,
        block_size=BLOCK,
        dtype=torch.float16,
        max_model_len=64,
        layer_shape=lambda n: (2, n, BLOCK, 2, 64),
    )
    budget, reason = platform.kv_cache_budget(request)
    assert budget > 0
    assert "minus a profiled peak of" in reason
