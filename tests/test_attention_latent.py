"""The single-plane latent KV cache (multi-head latent attention): the spec, the
reference backend's reading of it against plain softmax attention, the fallback for a
backend without it, and the bytes a KV request counts for it."""

from __future__ import annotations

import logging

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata, with_latent_cache
from kvrun.attention.reference import ReferenceAttention
from kvrun.errors import ConfigError
from kvrun.platforms import KVCacheRequest
from tests.fixtures.vendor_backend.acme_kvrun_backend.attention import AcmeAttention

HEADS, WIDTH, LATENT, BLOCK = 4, 24, 16, 4
SPEC = AttentionLayerSpec(HEADS, 1, WIDTH, WIDTH**-0.5)
LATENT_SPEC = AttentionLayerSpec(HEADS, 1, WIDTH, WIDTH**-0.5, latent_value_dim=LATENT)


def _meta(table: list[int], seq_len: int, query_len: int) -> AttentionMetadata:
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - query_len, seq_len)]
    return AttentionMetadata(
        num_tokens=query_len,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0, query_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.tensor([table], dtype=torch.int32),
        query_lens=[query_len],
        seq_lens_host=[seq_len],
        block_size=BLOCK,
        max_query_len=query_len,
        max_seq_len=seq_len,
    )


def test_the_spec_names_the_feature_and_counts_one_plane() -> None:
    assert LATENT_SPEC.features == {"latent_kv"} and LATENT_SPEC.kv_planes == 1
    assert SPEC.features == frozenset() and SPEC.kv_planes == 2
    with pytest.raises(ConfigError, match=r"latent_value_dim=25: .* 1\.\.head_dim=24"):
        AttentionLayerSpec(HEADS, 1, WIDTH, 1.0, latent_value_dim=WIDTH + 1)


def test_the_reference_reads_values_as_the_keys_first_columns() -> None:
    """A prefill in two chunks over scattered blocks, against softmax(q k^T) k[:, :LATENT]
    computed densely: the cache holds one plane and the output is LATENT wide."""
    g = torch.Generator().manual_seed(0)
    seq, table = 11, [5, 2, 7]
    q = torch.randn(seq, HEADS, WIDTH, generator=g)
    k = torch.randn(seq, 1, WIDTH, generator=g)
    backend = ReferenceAttention(LATENT_SPEC)
    cache = torch.full(backend.layer_cache_shape(8, BLOCK, 1, WIDTH), float("nan"))
    assert cache.shape == (1, 8, BLOCK, 1, WIDTH)
    first = backend.forward(q[:6], k[:6], k[:6], cache, _meta(table, 6, 6))
    second = backend.forward(q[6:], k[6:], k[6:], cache, _meta(table, seq, seq - 6))
    got = torch.cat((first, second))
    assert got.shape == (seq, HEADS, LATENT)

    scores = torch.einsum("qhd,kd->hqk", q, k[:, 0]) * WIDTH**-0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
    want = torch.einsum("hqk,kv->qhv", weights, k[:, 0, :LATENT])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_backend_without_the_feature_refuses_it_and_keeps_two_planes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ConfigError, match="ACME does not compute latent_kv"):
        AcmeAttention(LATENT_SPEC)
    plain = AcmeAttention(SPEC)
    with caplog.at_level(logging.INFO, logger="kvrun.attention.base"):
        assert with_latent_cache(plain, LATENT) is plain
    assert (
        "attention backend ACME keeps no single-plane latent cache (feature latent_kv): the "
        f"latent is cached as key and as value, 2 x {WIDTH} values per token and layer"
    ) in caplog.text
    latent = with_latent_cache(ReferenceAttention(SPEC), LATENT)
    assert latent.spec == LATENT_SPEC
    assert latent.layer_cache_shape(3, BLOCK, 1, WIDTH) == (1, 3, BLOCK, 1, WIDTH)


def test_a_kv_request_counts_its_planes() -> None:
    def request(planes: int) -> KVCacheRequest:
        return KVCacheRequest(
            num_layers=27,  # DeepSeek-V2-Lite's layers, its latent 512 + rope 64, bf16
            num_kv_heads=1,
            head_dim=576,
            block_size=16,
            dtype=torch.bfloat16,
            max_model_len=64,
            layer_shape=lambda n: (planes, n, 16, 1, 576),
            kv_planes=planes,
        )

    assert request(1).bytes_per_token == 27 * 576 * 2
    assert request(2).bytes_per_token == 2 * 27 * 576 * 2
    assert request(1).bytes_per_block == 16 * 27 * 576 * 2
