"""Tensor and pipeline parallelism with real ranks: Workers in their own processes over
gloo, inside a network namespace of their own (only loopback), on random float32
checkpoints.

The oracle is the same Worker at tensor_parallel_size=1, pipeline_parallel_size=1, which
runs the same arithmetic as the in-process engine (tests/engine checks that against
transformers). Pipeline stages do the same arithmetic in the same order: their logits
equal the oracle's bit for bit. Tensor parallelism sums the row-parallel projections
in another order: logits agree within 1e-4 and greedy tokens are equal except where the
oracle's top two logits are within that tolerance (a near-tie), which the test reports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.rank_jobs import (
    NEEDS_NAMESPACE,
    assert_pipeline_identical,
    compare_tensor_parallel,
    job,
    ok,
)

pytestmark = NEEDS_NAMESPACE

PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7],
    [42, 17, 9],
    [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310],
]
MAX_TOKENS = 6
TP_TOLERANCE = 1e-4
# 1 MiB of KV cache per rank: the block count then shows each rank's own share
KV_BUDGET = {"VLLM_CPU_KVCACHE_SPACE": str(1 / 1024)}
RENDEZVOUS_TIMEOUT_S = 3.0
UNHEARD_PORT = 29555  # nothing listens in a fresh network namespace


def rank_jobs(
    random_checkpoint: Callable[..., Path], classifier_dir: Path, tmp: Path
) -> list[dict[str, Any]]:
    """This file's jobs (run with test_ranks_families.py's by conftest.rank_runs)."""
    llama = random_checkpoint("llama", seed=3, num_layers=3, num_heads=4, num_kv_heads=2)
    # one KV head for two ranks: replicated; q/k/v biases
    qwen2 = random_checkpoint("qwen2", seed=4, num_layers=2, num_heads=4, num_kv_heads=1)
    # a tied lm_head: the last pipeline stage holds the embedding table too
    qwen3 = random_checkpoint(
        "qwen3", seed=5, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True
    )
    phi3 = random_checkpoint("phi3", seed=6, num_layers=2, num_heads=4, num_kv_heads=4)
    jobs: list[dict[str, Any]] = []

    def add(name: str, model: Path, tp: int, pp: int, **extra: Any) -> None:
        jobs.append(job(name, model, tp, pp, PROMPTS, MAX_TOKENS, tmp, **extra))

    budget = {"env": KV_BUDGET, "blocks": None}
    add("llama-tp1", llama, 1, 1, **budget)
    add("llama-tp2", llama, 2, 1, **budget)
    add("llama-pp2", llama, 1, 2)
    add("llama-pp2-partition", llama, 1, 2, env={"VLLM_PP_LAYER_PARTITION": "1,2"})
    add("llama-tp2-pp2", llama, 2, 2)
    for arch, model in (("qwen2", qwen2), ("qwen3", qwen3), ("phi3", phi3)):
        add(f"{arch}-tp1", model, 1, 1)
        add(f"{arch}-tp2", model, 2, 1)
    add("qwen2-pp2", qwen2, 1, 2)
    add("qwen3-pp2", qwen3, 1, 2)
    add("classifier-tp2", classifier_dir, 2, 1)
    add(
        "unreachable", llama, 2, 1, ranks=[1], timeout_s=RENDEZVOUS_TIMEOUT_S,
        init_method=f"tcp://127.0.0.1:{UNHEARD_PORT}",
    )  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def runs(rank_runs: dict[str, Any]) -> dict[str, Any]:
    return rank_runs


@pytest.mark.parametrize(
    ("name", "oracle"),
    [
        ("llama-pp2", "llama-tp1"),
        ("llama-pp2-partition", "llama-tp1"),
        ("qwen2-pp2", "qwen2-tp1"),
        ("qwen3-pp2", "qwen3-tp1"),
    ],
)
def test_pipeline_stages_compute_what_one_rank_does(
    runs: dict[str, Any], name: str, oracle: str
) -> None:
    got, want = ok(runs, name), ok(runs, oracle)
    assert len(got["logits"]) == MAX_TOKENS
    assert got["prompt_logits"].shape == (len(PROMPTS[0]), want["logits"][0].shape[1])
    assert_pipeline_identical(got, want)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tensor_parallel_logits_agree_with_one_rank(runs: dict[str, Any], arch: str) -> None:
    """qwen2 (1 KV head) replicates its KV head on both ranks; phi3 has merged q|k|v and
    gate|up weights; qwen3 per-head q/k norms and a tied lm_head."""
    largest, near_ties = compare_tensor_parallel(
        ok(runs, f"{arch}-tp2"), ok(runs, f"{arch}-tp1"), TP_TOLERANCE
    )
    print(f"{arch} tp=2 vs tp=1: max |logit diff| {largest:.2e}, near-ties: {near_ties or 'none'}")


def test_tensor_and_pipeline_parallel_together(runs: dict[str, Any]) -> None:
    compare_tensor_parallel(ok(runs, "llama-tp2-pp2"), ok(runs, "llama-tp1"), TP_TOLERANCE)


def test_each_rank_sizes_its_kv_cache_from_its_own_share(runs: dict[str, Any]) -> None:
    """The same 1 MiB budget holds twice the blocks when each rank keeps half the KV heads."""
    one, two = ok(runs, "llama-tp1")["blocks"], ok(runs, "llama-tp2")["blocks"]
    # 3 layers x (k, v) x 2 KV heads x 16 dims x 16 tokens x 4 bytes per block at tp=1
    assert one == (1 << 20) // (3 * 2 * 2 * 16 * 16 * 4)
    assert two == 2 * one


def test_an_unreachable_rendezvous_fails_in_bounded_time_naming_rank_and_address(
    runs: dict[str, Any],
) -> None:
    (error,) = runs["unreachable"]["errors"]
    assert error["type"] == "DistributedError"
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{UNHEARD_PORT}" in error["error"]
    assert f"within {RENDEZVOUS_TIMEOUT_S:g} s" in error["error"]
    # bounded: the timeout plus process set-up, never a hang (generous for a slow machine)
    assert error["elapsed"] < RENDEZVOUS_TIMEOUT_S + 60


def test_an_architecture_without_sharding_is_refused_on_every_rank(runs: dict[str, Any]) -> None:
    errors = runs["classifier-tp2"]["errors"]
    assert sorted(e["rank"] for e in errors) == [0, 1]
    for error in errors:
        assert error["type"] == "ConfigError"
        assert error["error"] == (
            "architecture Qwen3ForSequenceClassification does not support "
            "tensor_parallel_size>1 (asked 2) yet"
        )
