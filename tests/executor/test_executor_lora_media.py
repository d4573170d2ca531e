"""LoRA adapters and media inputs through the mp executor, against the in-process runner
(which tests/engine/test_lora.py and test_multimodal.py check against peft and
transformers), float32, each run in a loopback-only network namespace
(tests/executor/adapter_media_scenarios.py):

- a batch of every prompt with each of three adapters and none (more adapters than the
  two slots, so the ranks load and evict adapters as the engine says) through PP=2
  equals uni token for token and logprob for logprob (the same arithmetic), through
  TP=2 (adapters split as their projections, the row-parallel delta summed by the
  all-reduce) greedy equal but at near-ties, which the test shows, logprobs within 1e-4;
  run again, each (prompt, adapter) hits the prefix cache as in uni, never across
  adapters;
- the same batch through one Ray actor (a local cluster kvrun starts) equals uni;
- `kvrun serve --distributed-executor-backend mp`: an adapter loaded at run time answers
  as uni with it, unloaded it is a 404, loaded again under another name alike;
- a random Qwen2-VL with two images (chunked prefill cutting inside them) through PP=2
  (stage 0 encodes, both apply the M-RoPE positions) equals uni exactly, through TP=2
  likewise but at near-ties;
- the ranks run Qwen2-VL split either way (the mixtures', DeepSeek's and Gemma's
  adapters under tensor parallelism: tests/executor/test_executor_lora_families.py).

One scenario process runs them all (``runs``). TP=1 through the mp executor is not run
apart: its path (every step's adapters and media sent to a rank that runs them unsplit,
the same arithmetic as uni) is PP=2's, each stage a rank of its own, and a single rank
through an executor is the Ray actor's run.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrun.testing.checkpoints import build_random_qwen2_vl_checkpoint
from tests.executor import adapter_media_scenarios as scenarios
from tests.executor.scenarios import ScenarioResults
from tests.support.checkpoints import cached_build
from tests.support.lora import make_adapter

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)

LOGPROB_TOL = 1e-4  # float32 logprobs across different reduction orders
EXACT_TOL = 1e-5  # the same arithmetic in another process
NEAR_TIE = 1e-4  # top-2 logprobs closer than this may swap under another summation order
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def qwen2(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("qwen2", seed=5, num_layers=2)


@pytest.fixture(scope="module")
def adapters(qwen2: Path) -> dict[str, str]:
    """Three adapters (as tests/engine/test_lora.py's): ranks, modules, alpha, rsLoRA."""
    return {
        "all": str(make_adapter(qwen2, seed=1, r=8, alpha=16, targets=ALL)),
        "qv-rslora": str(
            make_adapter(qwen2, seed=2, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True)
        ),
        "mlp-o": str(
            make_adapter(qwen2, seed=3, r=2, alpha=4, targets=("o_proj", "gate_proj", "down_proj"))
        ),
    }


@pytest.fixture(scope="module")
def vl_dir(smollm2_hf_dir: Path) -> Path:
    return cached_build(
        "random-qwen2-vl",
        {"seed": 0},
        lambda out: build_random_qwen2_vl_checkpoint(out, tokenizer_dir=smollm2_hf_dir),
    )


@pytest.fixture(scope="module")
def runs(
    qwen2: Path, adapters: dict[str, str], vl_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ScenarioResults:
    """Every scenario of this module in one process: the adapters through one Ray actor
    (when the ray extra is there; first, while the process is fresh: a local Ray
    cluster's start is the slowest part on a loaded machine), under uni, PP=2, TP=2, the
    server's run-time adapter, the images under uni, PP=2, TP=2."""
    configs: list[dict[str, Any]] = [
        {"label": "uni"},
        {"label": "mp-pp2", "pipeline_parallel_size": 2},
        {"label": "mp-tp2", "tensor_parallel_size": 2},
    ]
    lora: dict[str, Any] = {"model": str(qwen2), "adapters": adapters}
    scenario_list: list[tuple[str, str, dict[str, Any]]] = []
    if importlib.util.find_spec("ray") is not None:  # apart: a Ray failure fails its test
        ray = [{"label": "ray-tp1", "distributed_executor_backend": "ray"}]
        scenario_list.append(("lora_ray", "lora_ray", {**lora, "configs": ray}))
    scenario_list.append(("lora", "lora", {**lora, "configs": configs}))
    serve = {
        "model": str(qwen2),
        "adapter": adapters["all"],
        "workdir": str(tmp_path_factory.mktemp("serve-lora")),
        "max_tokens": 8,
    }
    scenario_list.append(("serve", "serve_runtime_lora", serve))
    scenario_list.append(("media", "media", {"model": str(vl_dir), "configs": configs}))
    return scenarios.run_many(scenario_list, timeout_s=2400)


@pytest.fixture(scope="module")
def lora_runs(runs: ScenarioResults) -> dict[str, Any]:
    result: dict[str, Any] = runs["lora"]
    return result


def _assert_same(got: dict[str, Any], want: dict[str, Any], tol: float) -> None:
    assert got["tokens"] == want["tokens"]
    for row_got, row_want in zip(got["top2"], want["top2"], strict=True):
        for pos_got, pos_want in zip(row_got, row_want, strict=True):
            assert [t for t, _ in pos_got] == [t for t, _ in pos_want]
            for (_, a), (_, b) in zip(pos_got, pos_want, strict=True):
                assert abs(a - b) <= tol, (a, b)


def _assert_equal_but_near_ties(got: dict[str, Any], want: dict[str, Any], tol: float) -> None:
    """Greedy equal up to the first position where the reference's top two are within
    NEAR_TIE (then the rest of that sequence may differ); logprobs within ``tol`` before."""
    ties, worst = [], 0.0
    for i, (a, b) in enumerate(zip(got["tokens"], want["tokens"], strict=True)):
        for pos, (token_a, token_b) in enumerate(zip(a, b, strict=True)):
            top = want["top2"][i][pos]
            if token_a != token_b:
                gap = top[0][1] - top[1][1]
                assert gap < NEAR_TIE, f"sequence {i} differs at {pos}, top-2 gap {gap}"
                ties.append((i, pos, gap))
                break
            (_, lp_a), (_, lp_b) = got["top2"][i][pos][0], top[0]
            assert abs(lp_a - lp_b) <= tol, (i, pos, lp_a, lp_b)
            worst = max(worst, abs(lp_a - lp_b))
    print(
        f"largest logprob difference {worst:.2e}; near-ties where greedy differs "
        f"(sequence, position, top-2 gap): {ties}"
    )


def test_adapters_through_mp_pp2_equal_uni(lora_runs: dict[str, Any]) -> None:
    uni = lora_runs["uni"]
    assert uni["runner"] == "ModelRunner"
    # the adapters change the output: every prompt's four continuations are not all alike
    for i in range(len(scenarios.PROMPTS)):
        assert len({tuple(t) for t in uni["tokens"][4 * i : 4 * i + 4]}) > 1
    run = lora_runs["mp-pp2"]
    assert run["runner"] == "MultiprocExecutor"
    _assert_same(run, uni, EXACT_TOL)
    _assert_same(run["again"], uni["again"], EXACT_TOL)
    assert run["alive_after_close"] == []


def test_adapters_through_mp_tp2_equal_uni_but_near_ties(lora_runs: dict[str, Any]) -> None:
    uni, tp2 = lora_runs["uni"], lora_runs["mp-tp2"]
    _assert_equal_but_near_ties(tp2, uni, LOGPROB_TOL)
    _assert_equal_but_near_ties(tp2["again"], uni["again"], LOGPROB_TOL)
    assert tp2["alive_after_close"] == []
    assert lora_runs["segments_left"] == []


def test_prefix_cache_keys_keep_the_adapter_through_the_executor(
    lora_runs: dict[str, Any],
) -> None:
    uni = lora_runs["uni"]
    # run again, the 10-token prompt finds its first block of 8 with each adapter and
    # with none (each under its own key)
    assert uni["again"]["cached"][8:12] == [8, 8, 8, 8]
    for label in ("mp-pp2", "mp-tp2"):
        assert lora_runs[label]["cached"] == uni["cached"]
        assert lora_runs[label]["again"]["cached"] == uni["again"]["cached"]
        assert lora_runs[label]["engine_reads"] == 3  # each adapter checked once, at add
        assert lora_runs[label]["loras"] == [1, 2, 3]


def test_adapters_through_a_ray_actor_equal_uni(
    runs: ScenarioResults, lora_runs: dict[str, Any]
) -> None:
    pytest.importorskip("ray", reason="the ray extra (pip install 'kvrun[ray]')")
    ray_runs = runs["lora_ray"]
    ray_run, uni = ray_runs["ray-tp1"], lora_runs["uni"]
    assert ray_run["runner"] == "RayExecutor"
    _assert_same(ray_run, uni, EXACT_TOL)
    _assert_same(ray_run["again"], uni["again"], EXACT_TOL)
    assert ray_run["cached"] == uni["cached"]
    assert ray_run["alive_after_close"] == []
    assert ray_runs["ray_processes_left"] == []


def test_runtime_adapter_through_the_server_with_the_mp_executor(runs: ScenarioResults) -> None:
    out: dict[str, Any] = runs["serve"]
    assert out["workers"] >= 1, out["log_tail"]
    assert out["load"] == 200
    assert out["rt"] == [200, out["uni_rt"]]
    assert out["base"] == [200, out["uni_base"]]
    assert out["uni_rt"] != out["uni_base"]  # the adapter changes the answer
    assert out["unload"] == 200 and out["rt_after_unload"] == 404
    assert out["reload"] == 200 and out["rt2"] == [200, out["uni_rt"]]
    assert out["exit"] == 0, out["log_tail"]
    assert out["segments_left"] == []


def test_the_ranks_run_qwen2_vl_split_either_way() -> None:
    """(The mixtures' and DeepSeek's adapters under tensor parallelism:
    tests/executor/test_executor_lora_families.py.)"""
    from kvrun.distributed.parallel import ParallelConfig
    from kvrun.distributed.worker import unsupported_reason
    from kvrun.models.qwen2_vl import Qwen2VLForConditionalGeneration

    arch = "Qwen2VLForConditionalGeneration"
    for split in (ParallelConfig(2, 1), ParallelConfig(1, 2)):
        assert unsupported_reason(Qwen2VLForConditionalGeneration, arch, split) is None


def test_qwen2_vl_images_through_mp_tp2_and_pp2_equal_uni(runs: ScenarioResults) -> None:
    media: dict[str, Any] = runs["media"]
    uni = media["uni"]
    assert uni["tokens"][0] != uni["tokens"][1], "the image must change the output"
    assert media["mp-pp2"]["runner"] == "MultiprocExecutor"
    _assert_same(media["mp-pp2"], uni, EXACT_TOL)
    _assert_equal_but_near_ties(media["mp-tp2"], uni, LOGPROB_TOL)
    assert media["mp-pp2"]["prompt_lens"] == uni["prompt_lens"]
    assert media["mp-pp2"]["alive_after_close"] == []
    assert media["mp-tp2"]["alive_after_close"] == []
    assert media["segments_left"] == []
