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

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)

REPO = Path(__file__).resolve().parents[2]
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


def _run_in_namespace(jobs: list[dict[str, Any]], tmp: Path) -> dict[str, int]:
    jobs_path, summary = tmp / "jobs.json", tmp / "summary.json"
    jobs_path.write_text(json.dumps(jobs))
    command = (
        f"ip link set lo up && exec {sys.executable} -m tests.distributed.ranks "
        f"{jobs_path} {summary}"
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if not summary.exists():
        pytest.fail(f"the ranks' runner failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, int] = json.loads(summary.read_text())
    return result


@pytest.fixture(scope="module")
def runs(
    random_checkpoint: Callable[..., Path],
    classifier_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every job run once, in one namespace: name -> the driver's output, or the ranks'
    error records."""
    llama = random_checkpoint("llama", seed=3, num_layers=3, num_heads=4, num_kv_heads=2)
    # one KV head for two ranks: replicated; q/k/v biases
    qwen2 = random_checkpoint("qwen2", seed=4, num_layers=2, num_heads=4, num_kv_heads=1)
    # a tied lm_head: the last pipeline stage holds the embedding table too
    qwen3 = random_checkpoint(
        "qwen3", seed=5, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True
    )
    phi3 = random_checkpoint("phi3", seed=6, num_layers=2, num_heads=4, num_kv_heads=4)
    tmp = tmp_path_factory.mktemp("ranks")
    jobs: list[dict[str, Any]] = []

    def job(name: str, model: Path, tp: int, pp: int, **extra: Any) -> None:
        jobs.append(
            {"name": name, "model": str(model), "tp": tp, "pp": pp, "prompts": PROMPTS,
             "max_tokens": MAX_TOKENS, "out": str(tmp / f"{name}.pt"), **extra}
        )  # fmt: skip

    budget = {"env": KV_BUDGET, "blocks": None}
    job("llama-tp1", llama, 1, 1, **budget)
    job("llama-tp2", llama, 2, 1, **budget)
    job("llama-pp2", llama, 1, 2)
    job("llama-pp2-partition", llama, 1, 2, env={"VLLM_PP_LAYER_PARTITION": "1,2"})
    job("llama-tp2-pp2", llama, 2, 2)
    for arch, model in (("qwen2", qwen2), ("qwen3", qwen3), ("phi3", phi3)):
        job(f"{arch}-tp1", model, 1, 1)
        job(f"{arch}-tp2", model, 2, 1)
    job("qwen2-pp2", qwen2, 1, 2)
    job("qwen3-pp2", qwen3, 1, 2)
    job("classifier-tp2", classifier_dir, 2, 1)
    job(
        "unreachable", llama, 2, 1, ranks=[1], timeout_s=RENDEZVOUS_TIMEOUT_S,
        init_method=f"tcp://127.0.0.1:{UNHEARD_PORT}",
    )  # fmt: skip
    failed = _run_in_namespace(jobs, tmp)
    out: dict[str, Any] = {}
    for spec in jobs:
        name, path = spec["name"], Path(spec["out"])
        errors = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{name}.pt.rank*"))]
        if failed[name] or errors:
            out[name] = {"errors": errors}
        else:
            out[name] = torch.load(path)
    return out


def _ok(runs: dict[str, Any], name: str) -> dict[str, Any]:
    run = runs[name]
    assert "errors" not in run, f"{name} failed: {run['errors']}"
    return run  # type: ignore[no-any-return]


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
    got, want = _ok(runs, name), _ok(runs, oracle)
    assert got["tokens"] == want["tokens"]
    for step, (a, b) in enumerate(zip(got["logits"], want["logits"], strict=True)):
        assert torch.equal(a, b), f"step {step}: pipeline logits differ from one rank's"
    assert got["prompt_logits"].shape == (len(PROMPTS[0]), want["logits"][0].shape[1])
    assert torch.equal(got["prompt_logits"], want["prompt_logits"])


def _compare_tensor_parallel(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Logits within TP_TOLERANCE while the inputs agree; tokens equal unless the
    oracle's top two were a near-tie there. Returns the near-ties seen."""
    near_ties = []
    prompt_diff = (got["prompt_logits"] - want["prompt_logits"]).abs().max().item()
    assert prompt_diff < TP_TOLERANCE, f"prompt logits differ by {prompt_diff}"
    for r in range(len(PROMPTS)):
        for step in range(MAX_TOKENS):
            a, b = got["logits"][step][r], want["logits"][step][r]
            diff = (a - b).abs().max().item()
            assert diff < TP_TOLERANCE, f"request {r} step {step}: logits differ by {diff}"
            if got["tokens"][r][step] != want["tokens"][r][step]:
                top2 = b.topk(2).values
                gap = (top2[0] - top2[1]).item()
                assert gap < TP_TOLERANCE, f"request {r} step {step}: tokens differ, gap {gap}"
                near_ties.append(f"request {r} step {step}: top-2 gap {gap:.2e}")
                break  # the inputs differ from here on
    return near_ties


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_tensor_parallel_logits_agree_with_one_rank(runs: dict[str, Any], arch: str) -> None:
    """qwen2 (1 KV head) replicates its KV head on both ranks; phi3 has merged q|k|v and
    gate|up weights; qwen3 per-head q/k norms and a tied lm_head."""
    near_ties = _compare_tensor_parallel(_ok(runs, f"{arch}-tp2"), _ok(runs, f"{arch}-tp1"))
    print(f"{arch}: tensor-parallel greedy tokens differ only at near-ties: {near_ties or 'none'}")


def test_tensor_and_pipeline_parallel_together(runs: dict[str, Any]) -> None:
    _compare_tensor_parallel(_ok(runs, "llama-tp2-pp2"), _ok(runs, "llama-tp1"))


def test_each_rank_sizes_its_kv_cache_from_its_own_share(runs: dict[str, Any]) -> None:
    """The same 1 MiB budget holds twice the blocks when each rank keeps half the KV heads."""
    one, two = _ok(runs, "llama-tp1")["blocks"], _ok(runs, "llama-tp2")["blocks"]
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
