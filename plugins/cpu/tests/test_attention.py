"""The CPU attention backends against the core's ReferenceAttention.

Each case runs two steps through both backends, each on its own cache filled with
random garbage: step 1 writes every request's cached context (as prefills), step 2 is
the batch under test. Block ids are shuffled and non-contiguous, so a backend that
reads the wrong block, a padded tail or another request's tokens disagrees.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun_cpu.attention import TorchSdpaAttention
from kvrun_cpu.attention.plan import build_plan, group_decodes

BLOCK_SIZE = 16
NUM_BLOCKS = 160
HEAD_DIM = 32
Factory = Callable[[AttentionLayerSpec], AttentionBackend]
GQA = [(4, 4), (9, 3), (8, 2)]  # (query heads, kv heads): groups of 1, 3 and 4
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_meta(
    tables: list[list[int]],  # per request: its block ids, in order
    seq_lens: list[int],  # context after this step
    query_lens: list[int],  # new tokens, the last of the context
    block_size: int = BLOCK_SIZE,
) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    slots = []
    for table, s_len, q_len in zip(tables, seq_lens, query_lens, strict=True):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        num_tokens=sum(query_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens=list(query_lens),
        seq_lens_host=list(seq_lens),
        block_size=block_size,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


@pytest.fixture(params=["torch", "native"])
def make_backend(request: pytest.FixtureRequest) -> Factory:
    """TORCH_SDPA on its torch paths, and with the native kernels (cache writes, decodes)."""
    if request.param == "torch":
        return TorchSdpaAttention
    native = request.getfixturevalue("native_kernels")
    return lambda spec: TorchSdpaAttention(spec, native=native)


def run_case(
    make_backend: Factory,
    requests: list[tuple[int, int]],  # (cached tokens, new tokens) per request
    heads: tuple[int, int],
    dtype: torch.dtype,
    seed: int = 0,
    *,
    head_dim: int = HEAD_DIM,
    latent: int | None = None,  # the latent cache's value width (values = keys[..., :latent])
    window: int | None = None,  # a sliding window (the reference computes it)
) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    spec = AttentionLayerSpec(
        num_heads,
        num_kv_heads,
        head_dim,
        head_dim**-0.5,
        latent_value_dim=latent,
        sliding_window=window,
    )
    backends = [ReferenceAttention(spec), make_backend(spec)]
    caches = [
        torch.randn(
            b.layer_cache_shape(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim), generator=gen
        )
        .mul_(3.0)
        .to(dtype)
        for b in backends
    ]
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables = []
    for cached, new in requests:
        n_blocks = -(-(cached + new) // BLOCK_SIZE)
        tables.append([free.pop() for _ in range(n_blocks)])
    steps = [
        [(i, c, c) for i, (c, _) in enumerate(requests) if c > 0],  # (request, seq, query)
        [(i, c + n, n) for i, (c, n) in enumerate(requests)],
    ]
    for step in steps:
        if not step:
            continue
        meta = make_meta(
            [tables[i] for i, _, _ in step], [s for _, s, _ in step], [q for *_, q in step]
        )
        shape = (meta.num_tokens, num_heads, head_dim)
        kv_shape = (meta.num_tokens, num_kv_heads, head_dim)
        q = torch.randn(shape, generator=gen).to(dtype)
        k = torch.randn(kv_shape, generator=gen).to(dtype)
        v = k if latent is not None else torch.randn(kv_shape, generator=gen).to(dtype)
        want = backends[0].forward(q, k, v, caches[0], meta)
        got = backends[1].forward(q, k, v, caches[1], meta)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("heads", GQA, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
class TestAgainstReference:
    def test_decode_batch_of_varied_lengths(
        self, make_backend: Factory, heads: tuple[int, int], dtype: torch.dtype
    ) -> None:
        # Very different lengths: several decode groups, scattered token positions.
        lens = [1, 5, 16, 17, 33, 100, 250, 600, 2, 31]
        run_case(make_backend, [(n - 1, 1) for n in lens], heads, dtype)
        # Similar lengths: one group over a contiguous token run, its tail masked.
        run_case(make_backend, [(29, 1), (19, 1), (44, 1), (47, 1)], heads, dtype, seed=1)

    def test_prefill(
        self, make_backend: Factory, heads: tuple[int, int], dtype: torch.dtype
    ) -> None:
        run_case(make_backend, [(0, 37)], heads, dtype)

    def test_chunked_prefill_after_prefix_hit(
        self, make_backend: Factory, heads: tuple[int, int], dtype: torch.dtype
    ) -> None:
        run_case(make_backend, [(40, 23), (16, 16)], heads, dtype)

    def test_mixed_prefill_and_decode(
        self, make_backend: Factory, heads: tuple[int, int], dtype: torch.dtype
    ) -> None:
        requests = [(49, 1), (0, 30), (6, 1), (16, 17), (199, 1), (0, 1), (3, 2)]
        run_case(make_backend, requests, heads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("head_dim", "latent"),
    [(48, 32), (576, 512)],  # small, and DeepSeek-V2's kv_lora_rank 512 + rope 64
    ids=["d48-latent32", "v2-d576-latent512"],
)
def test_the_latent_cache_matches_the_reference(
    make_backend: Factory, head_dim: int, latent: int, dtype: torch.dtype
) -> None:
    # One plane per layer, each value the first `latent` columns of its key: decodes of
    # varied lengths, a prefill, a chunk after a prefix hit, in one batch.
    requests = [(49, 1), (0, 30), (6, 1), (16, 17), (199, 1), (0, 1)]
    run_case(make_backend, requests, (8, 1), dtype, head_dim=head_dim, latent=latent)


def test_the_latent_cache_is_one_plane() -> None:
    spec = AttentionLayerSpec(4, 1, 576, 576**-0.5, latent_value_dim=512)
    backend = TorchSdpaAttention(spec)
    assert backend.layer_cache_shape(10, 16, 1, 576) == (1, 1, 10, 16, 576)
    assert spec.kv_planes == 1 and "latent_kv" in TorchSdpaAttention.features


@pytest.mark.parametrize(
    ("requests", "reference_calls"),
    [
        ([(9, 1), (0, 12), (4, 3), (15, 1)], 0),  # every context within the window
        ([(40, 1), (0, 30), (20, 5), (3, 1)], 2),  # some past it: both steps gather
    ],
    ids=["within", "past"],
)
def test_a_sliding_window_gathers_only_when_it_masks_something(
    make_backend: Factory,
    monkeypatch: pytest.MonkeyPatch,
    requests: list[tuple[int, int]],
    reference_calls: int,
) -> None:
    from kvrun_cpu.attention import sdpa

    calls = []
    gather = sdpa.reference.paged_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return gather(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sdpa.reference, "paged_attention", counted)
    run_case(make_backend, requests, (8, 2), torch.float32, window=16)
    # The oracle (ReferenceAttention) gathers once in each of the two steps; the rest
    # are the backend's.
    assert len(calls) - 2 == reference_calls


def test_single_token_prompt(make_backend: Factory) -> None:
    run_case(make_backend, [(0, 1)], (9, 3), torch.float32)
    run_case(make_backend, [(20, 1), (0, 5)], (9, 3), torch.float32, seed=3)


def test_group_decodes_splits_only_when_padding_is_costly() -> None:
    assert group_decodes([10, 600, 590, 12], min_saved_rows=512) == [[1, 2], [0, 3]]
    assert group_decodes([10, 600, 590, 12], min_saved_rows=10**6) == [[0, 1, 2, 3]]
    assert group_decodes([5], min_saved_rows=1) == [[0]]
    assert group_decodes([], min_saved_rows=1) == []


def test_plan_keeps_contiguous_decodes_as_a_slice_and_scatters_others() -> None:
    meta = make_meta([[7], [3, 9], [4]], seq_lens=[5, 20, 2], query_lens=[1, 4, 1])
    plan = build_plan(meta.query_lens, meta.seq_lens_host, meta.block_tables, BLOCK_SIZE)
    (group,) = plan.decodes
    assert group.seqs == (0, 2)
    assert isinstance(group.tokens, torch.Tensor) and group.tokens.tolist() == [0, 5]
    assert group.block_ids.tolist() == [7, 4]
    assert group.span == 5
    assert group.mask is not None
    assert group.mask.view(2, 5).tolist() == [[True] * 5, [True, True, False, False, False]]
    (prefill,) = plan.prefills
    assert (prefill.tokens, prefill.cached_len, prefill.block_ids.tolist()) == (
        slice(1, 5),
        16,
        [3, 9],
    )
    assert prefill.mask is not None and prefill.mask.shape == (4, 20)
    assert prefill.mask[0].tolist() == [True] * 17 + [False] * 3

    decodes = make_meta([[1], [2]], seq_lens=[3, 3], query_lens=[1, 1])
    plan = build_plan(decodes.query_lens, decodes.seq_lens_host, decodes.block_tables, BLOCK_SIZE)
    assert plan.decodes[0].tokens == slice(0, 2) and plan.decodes[0].mask is None


def test_plan_is_built_once_per_step_and_rebuilt_when_block_tables_change() -> None:
    backend = TorchSdpaAttention(AttentionLayerSpec(4, 2, HEAD_DIM, 0.1))
    meta = make_meta([[1], [2]], seq_lens=[3, 4], query_lens=[1, 1])
    first = backend.plan(meta)
    assert backend.plan(meta) is first
    meta.block_tables[1, 0] = 5  # a runner reusing its tables buffer in place
    second = backend.plan(meta)
    assert second is not first
    assert second.decodes[0].block_ids.tolist() == [1, 5]


def test_kv_cache_layout_is_head_major() -> None:
    assert TorchSdpaAttention.kv_cache_shape(10, 16, 3, 64) == (2, 3, 10, 16, 64)


def test_runs_under_inference_mode(make_backend: Factory) -> None:
    # The engine runs the model under torch.inference_mode: its tensors carry no version
    # counters, and the plan cache must not rely on them.
    with torch.inference_mode():
        run_case(make_backend, [(49, 1), (0, 30), (6, 1)], (9, 3), torch.float32)
