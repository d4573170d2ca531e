"""LoRA adapters under tensor parallelism on the families beyond the dense Llama layout,
through the mp executor (TP=2) against the in-process runner (which
tests/engine/test_lora_families.py and test_lora_deepseek.py check against peft), float32,
each run in a loopback-only network namespace (tests/executor/adapter_media_scenarios.py):

- Qwen3-MoE (layer 0 a dense MLP): an adapter on every module, which peft turns into the
  routed experts' fused parameters (each expert's gate|up B rows and down A columns split
  by the expert intermediate dimension), and one on q_proj and the experts;
- Qwen2-MoE (layer 1 a dense MLP among mixtures): one adapter on attention, the dense
  MLP, the shared expert (split by its own intermediate dimension, its sigmoid gate
  replicated) and the routed experts' down projections;
- DeepSeek-V2 (latent attention, shared and routed experts): one adapter on q_proj (split
  by heads), kv_a_proj_with_mqa (replicated), o_proj (row-parallel), the shared experts
  and the routed experts;
- Gemma 2: an adapter on every projection (its o and down deltas added before the
  all-reduce).

Each prompt with each adapter and with none, in one batch, twice (the second time from
the prefix cache): greedy equal to uni but at near-ties, logprobs within 1e-4 (the largest
difference is printed). The four families run one after the other in one scenario
process (``runs``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine.test_lora_families import GEMMA, MOE
from tests.engine.test_parity_mla import MODELS as V2_MODELS
from tests.executor import adapter_media_scenarios as scenarios
from tests.executor.scenarios import ScenarioResults
from tests.executor.test_executor_lora_media import (
    ALL,
    LOGPROB_TOL,
    _assert_equal_but_near_ties,
)
from tests.support.lora import make_adapter

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _qwen3_moe(random_checkpoint: Callable[..., Path]) -> tuple[Path, dict[str, Path]]:
    arch, kwargs = MOE["qwen3-moe"]
    base = random_checkpoint(arch, seed=11, init_std=0.3, num_layers=3, **kwargs)
    return base, {
        "all": make_adapter(base, seed=1, r=4, alpha=8, targets=ALL),
        "experts": make_adapter(
            base, seed=2, r=4, alpha=8, targets=("q_proj",), target_parameters=EXPERTS, std=0.2
        ),
    }


def _qwen2_moe(random_checkpoint: Callable[..., Path]) -> tuple[Path, dict[str, Path]]:
    arch, kwargs = MOE["qwen2-moe"]
    base = random_checkpoint(arch, seed=11, init_std=0.3, num_layers=3, **kwargs)
    return base, {
        "all": make_adapter(
            base, seed=1, r=4, alpha=8, targets=ALL, target_parameters=EXPERTS[1:], std=0.2
        )
    }


def _deepseek_v2(random_checkpoint: Callable[..., Path]) -> tuple[Path, dict[str, Path]]:
    base = random_checkpoint(
        "deepseek_v2",
        seed=5,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=V2_MODELS["v2-lite-shaped"],
    )
    modules = (
        r".*(self_attn\.(q_proj|kv_a_proj_with_mqa|o_proj)"
        r"|mlp\.shared_experts\.(gate|up|down)_proj)"
    )
    return base, {
        "attention-experts": make_adapter(
            base, seed=6, r=4, alpha=8, targets=modules, target_parameters=EXPERTS, std=0.2
        )
    }


def _gemma2(random_checkpoint: Callable[..., Path]) -> tuple[Path, dict[str, Path]]:
    base = random_checkpoint("gemma2", seed=11, init_std=0.3, num_layers=3, **GEMMA["gemma2"])
    return base, {"all": make_adapter(base, seed=1, r=8, alpha=16, targets=ALL, std=0.3)}


FAMILIES = {
    "qwen3-moe": _qwen3_moe,
    "qwen2-moe": _qwen2_moe,
    "deepseek-v2": _deepseek_v2,
    "gemma2": _gemma2,
}


@pytest.fixture(scope="module")
def runs(random_checkpoint: Callable[..., Path]) -> ScenarioResults:
    """Each family's :func:`adapter_media_scenarios.lora` (uni, then TP=2 on the mp
    executor) by the family's name, all in one process."""
    configs = [{"label": "uni"}, {"label": "mp-tp2", "tensor_parallel_size": 2}]
    runs = []
    for family, build in FAMILIES.items():
        base, adapters = build(random_checkpoint)
        arguments = {
            "model": str(base),
            "adapters": {name: str(path) for name, path in adapters.items()},
            "configs": configs,
            "max_tokens": 6,
        }
        runs.append((family, "lora", arguments))
    return scenarios.run_many(runs, timeout_s=2400)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapters_through_mp_tp2_equal_uni_but_near_ties(
    family: str, runs: ScenarioResults
) -> None:
    run: dict[str, Any] = runs[family]
    uni, tp2 = run["uni"], run["mp-tp2"]
    assert uni["runner"] == "ModelRunner" and tp2["runner"] == "MultiprocExecutor"
    # the adapters change the output: no prompt's continuations are all alike
    choices = len(uni["tokens"]) // len(scenarios.PROMPTS)  # the adapters and none
    for i in range(len(scenarios.PROMPTS)):
        rows = uni["tokens"][choices * i : choices * (i + 1)]
        assert len({tuple(t) for t in rows}) > 1, (family, i)
    _assert_equal_but_near_ties(tp2, uni, LOGPROB_TOL)
    _assert_equal_but_near_ties(tp2["again"], uni["again"], LOGPROB_TOL)
    assert tp2["alive_after_close"] == []
    assert run["segments_left"] == []


def test_each_rank_keeps_its_experts_share_and_the_deltas_sum_to_the_whole(
    random_checkpoint: Callable[..., Path],
) -> None:
    """shard_adapter on Qwen3-MoE's routed experts: a rank's gate|up delta is the whole
    delta's rows of its share of the gate's and of the up's intermediate rows; the ranks'
    down deltas, each from its share of the intermediate input, sum to the whole's. A
    module outside the sharding table is named (the engine refuses it under TP) and
    refused, naming the architecture and module."""
    import json

    import torch

    from kvrun.distributed.parallel import ParallelConfig, ShardLayout
    from kvrun.lora.adapter import LoraAdapter, LoraError, load_adapter
    from kvrun.lora.request import LoRARequest
    from kvrun.lora.sharding import shard_adapter, unsplit_modules
    from kvrun.models.config import ModelConfig
    from kvrun.models.llama import MixtureOfExpertsForCausalLM
    from kvrun.ops import reference_ops

    base, adapters = _qwen3_moe(random_checkpoint)
    model = ModelConfig.from_hf(json.loads((base / "config.json").read_text()), str(base))
    meta = torch.device("meta")
    targets = MixtureOfExpertsForCausalLM(
        model, reference_ops(), None, torch.float32, meta
    ).lora_targets()
    adapter = load_adapter(LoRARequest("experts", 1, str(adapters["experts"])), targets, 8)
    ranks = [
        shard_adapter(adapter, ShardLayout.build(model, ParallelConfig(2, 1), r), model)
        for r in range(2)
    ]
    inter, half = model.moe_intermediate_size, model.moe_intermediate_size // 2
    x = torch.randn(3, model.hidden_size)
    a, b = adapter.weights[(1, "experts.gate_up_proj")]  # [E, r, H], [E, 2I, r]
    whole = torch.einsum("th,erh,eor->eto", x, a, b)
    for r, shard in enumerate(ranks):
        a_r, b_r = shard.weights[(1, "experts.gate_up_proj")]
        rows = [*range(r * half, (r + 1) * half), *range(inter + r * half, inter + (r + 1) * half)]
        torch.testing.assert_close(torch.einsum("th,erh,eor->eto", x, a_r, b_r), whole[..., rows])
    inner = torch.randn(3, inter)
    a, b = adapter.weights[(1, "experts.down_proj")]  # [E, r, I], [E, H, r]
    parts = [
        torch.einsum(
            "ti,eri,eor->eto",
            inner[:, r * half : (r + 1) * half],
            *shard.weights[(1, "experts.down_proj")],
        )
        for r, shard in enumerate(ranks)
    ]
    torch.testing.assert_close(sum(parts), torch.einsum("ti,eri,eor->eto", inner, a, b))

    assert unsplit_modules(targets.modules) == []  # the engine takes them under TP
    assert unsplit_modules(["q_proj", "router"]) == ["router"]
    odd = LoraAdapter(adapter.request, 4, 2.0, {(0, "router"): (a[0], b[0])})
    layout = ShardLayout.build(model, ParallelConfig(2, 1), 0)
    with pytest.raises(LoraError, match="Qwen3MoeForCausalLM's module router is not split"):
        shard_adapter(odd, layout, model)
