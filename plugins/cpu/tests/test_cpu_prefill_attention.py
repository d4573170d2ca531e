"""The native prefill attention: against the reference op on every ISA this CPU runs, and
bit for bit the same whatever the chunking, the batch, or decode one token at a time."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvrun.ops import reference
from kvrun_cpu.native import NativeKernels

TOL = {torch.float32: {"atol": 2e-5, "rtol": 2e-5}, torch.bfloat16: {}, torch.float16: {}}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK = 16


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Cache:
    """A paged cache in the reference layout [NB, bs, Hk, D], random blocks per request."""

    def __init__(
        self, lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_blocks = sum(-(-n // BLOCK) for n in lens) + 7
        free = torch.randperm(num_blocks, generator=gen).tolist()
        rows = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lens]
        width = max(len(r) for r in rows)
        self.tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
        self.keys = randn(num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype, seed=seed + 1)
        self.values = randn(num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype, seed=seed + 2)

    def prefill(
        self,
        native: NativeKernels,
        query: torch.Tensor,  # [T, Hq, D]
        seqs: list[int],  # requests (rows of tables) in the batch
        seq_lens: list[int],
        q_lens: list[int],
        scale: float,
    ) -> torch.Tensor:
        starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
        out = torch.full_like(query, float("nan"))
        native.paged_prefill(
            query,
            self.keys.permute(2, 0, 1, 3),
            self.values.permute(2, 0, 1, 3),
            self.tables[seqs].contiguous(),
            torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor(q_lens, dtype=torch.int32),
            scale,
            out,
        )
        return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 48)])
def test_prefill_matches_the_reference(
    native_any_isa: NativeKernels, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> None:
    # Whole prompts, chunks after cached tokens, a one-token chunk, a long prompt.
    seq_lens = [37, 200, 64, 301, 5]
    q_lens = [37, 40, 1, 301, 3]
    cache = Cache(seq_lens, kv_heads, head_dim, dtype)
    query = randn(sum(q_lens), heads, head_dim, dtype=dtype, seed=3)
    scale = head_dim**-0.5
    got = cache.prefill(native_any_isa, query, list(range(5)), seq_lens, q_lens, scale)
    want = reference.paged_attention(
        query, cache.keys, cache.values, cache.tables, seq_lens, q_lens, scale
    )
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_query_gets_the_same_bits_however_its_prompt_is_cut(
    native_any_isa: NativeKernels, dtype: torch.dtype
) -> None:
    """Whole, in 16-token chunks, in uneven chunks beside other requests, and one token
    at a time through the decode kernel: every query's output is bit-identical."""
    heads, kv_heads, head_dim, length = 9, 3, 64, 203
    cache = Cache([length, 120], kv_heads, head_dim, dtype, seed=5)
    query = randn(length, heads, head_dim, dtype=dtype, seed=6)
    other = randn(50, heads, head_dim, dtype=dtype, seed=7)
    scale = head_dim**-0.5
    whole = cache.prefill(native_any_isa, query, [0], [length], [length], scale)

    def chunked(cuts: list[int], with_other: bool) -> torch.Tensor:
        parts = []
        for lo, hi in itertools.pairwise(cuts):
            if with_other:  # another request's chunk first in the same call
                q = torch.cat([other, query[lo:hi]])
                out = cache.prefill(native_any_isa, q, [1, 0], [120, hi], [50, hi - lo], scale)
                parts.append(out[50:])
            else:
                parts.append(
                    cache.prefill(native_any_isa, query[lo:hi], [0], [hi], [hi - lo], scale)
                )
        return torch.cat(parts)

    by_16 = chunked([*range(0, length, 16), length], with_other=False)
    uneven = chunked([0, 1, 7, 40, 41, 130, length], with_other=True)
    decoded = torch.empty_like(query)
    native_any_isa.paged_decode(
        query,
        cache.keys.permute(2, 0, 1, 3),
        cache.values.permute(2, 0, 1, 3),
        cache.tables[[0] * length].contiguous(),
        torch.arange(1, length + 1, dtype=torch.int32),
        scale,
        decoded,
    )
    assert torch.equal(whole, by_16)
    assert torch.equal(whole, uneven)
    assert torch.equal(whole, decoded)
