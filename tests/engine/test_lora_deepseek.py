"""LoRA adapters on DeepSeek-V2/V3: kvrun's greedy output with PEFT adapters on the
latent attention's projections (q_proj, or q_a_proj and q_b_proj; kv_a_proj_with_mqa;
o_proj) equals peft's on transformers, in each attention mode, in a batch mixing
adapters and none; kv_b_proj is adapted where every head is cached (VLLM_MLA_DISABLE=1)
and refused by name where absorption folds it.

The dense layer's MLP (gate_proj, up_proj, down_proj) cannot be adapted by peft 0.21
on transformers 5's DeepSeek classes: peft rewrites those target names into the fused
routed experts' parameters and never wraps the dense MLP. Its adapter is written here
in PEFT's format instead, and the oracle is transformers on the base weights with the
adapter merged (W + alpha / r * B A): tokens equal, logprobs within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from kvrun.errors import RequestError
from kvrun.lora.request import LoRARequest
from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_deepseek_v3 import MODELS as V3_MODELS
from tests.engine.test_parity_mla import MODELS as V2_MODELS
from tests.engine.test_parity_mla import MODES
from tests.support.checkpoints import cached_build
from tests.support.engine import hf_greedy, make_engine
from tests.support.lora import make_adapter, peft_greedy

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [10, 20, 30, 40], list(range(100, 120))]
STEPS = 8
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)


def _v2(random_checkpoint: Callable[..., Path]) -> Path:
    """test_parity_mla's V2-Lite-shaped model (q_proj from the hidden state)."""
    return random_checkpoint(
        "deepseek_v2",
        seed=5,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=V2_MODELS["v2-lite-shaped"],
    )


def _v3(random_checkpoint: Callable[..., Path]) -> Path:
    """test_parity_deepseek_v3's V3-shaped model (q through q_a_proj and q_b_proj)."""
    return random_checkpoint(
        "deepseek_v3",
        seed=7,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=V3_MODELS["v3-shaped"],
    )


def _run(engine: object, loras: Sequence[LoRARequest | None]) -> list[list[int]]:
    """Every prompt with every adapter (and none) in one batch; tokens in that order."""
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.engine.output_accumulator import OutputAccumulator

    assert isinstance(engine, LLMEngine)
    accumulator = OutputAccumulator()
    ids = []
    for prompt in PROMPTS:
        for lora in loras:
            ids.append(engine.new_request_id())
            engine.add_request(ids[-1], prompt, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                done[out.request_id] = out
    return [list(done[r].outputs[0].token_ids) for r in ids]


def _check(base: Path, adapters: Sequence[Path], env: dict[str, str]) -> None:
    engine = make_engine(
        base, env=env, enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128
    )
    loras = [None, *(LoRARequest(f"a{i}", i + 1, str(a)) for i, a in enumerate(adapters))]
    got = _run(engine, loras)
    plain = peft_greedy(base, None, PROMPTS, STEPS)
    for k, lora in enumerate(loras):
        adapter = None if lora is None else adapters[k - 1]
        want = plain if adapter is None else peft_greedy(base, adapter, PROMPTS, STEPS)
        if adapter is not None:
            assert want != plain, f"adapter {k} changes nothing: the test proves nothing"
        for p in range(len(PROMPTS)):
            assert got[p * len(loras) + k] == want[p], (k, p)


@pytest.mark.parametrize("mode", list(MODES))
def test_deepseek_v2_adapters_equal_peft(mode: str, random_checkpoint: Callable[..., Path]) -> None:
    base = _v2(random_checkpoint)
    attention = r".*self_attn\.(q_proj|kv_a_proj_with_mqa|o_proj)"
    adapters = [
        make_adapter(base, seed=1, r=8, alpha=16, targets=attention),
        make_adapter(base, seed=2, r=4, alpha=8, targets=("q_proj", "o_proj"), std=0.2),
    ]
    _check(base, adapters, MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
def test_deepseek_v3_adapters_equal_peft(mode: str, random_checkpoint: Callable[..., Path]) -> None:
    base = _v3(random_checkpoint)
    attention = r".*self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|o_proj)"
    adapters = [make_adapter(base, seed=3, r=8, alpha=16, targets=attention)]
    _check(base, adapters, MODES[mode])


def test_kv_b_proj_is_adapted_only_where_every_head_is_cached(
    random_checkpoint: Callable[..., Path],
) -> None:
    base = _v2(random_checkpoint)
    adapter = make_adapter(base, seed=4, r=4, alpha=8, targets=("kv_b_proj",), std=0.2)
    _check(base, [adapter], MODES["mla-disabled"])
    engine = make_engine(base, enable_lora=True, max_lora_rank=8, max_model_len=128)
    with pytest.raises(RequestError, match="target module 'kv_b_proj' is not a projection"):
        engine.add_request("r", [1, 2, 3], GREEDY, lora_request=LoRARequest("kvb", 1, str(adapter)))


MLP = ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 4, 8.0


def _mlp_adapter(base: Path, out: Path) -> Path:
    """A PEFT-format adapter on layer 0's dense MLP, random A and B (seed 6)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((base / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for module, (rows, cols) in shapes.items():
        key = f"base_model.model.model.layers.0.mlp.{module}"
        tensors[f"{key}.lora_A.weight"] = 0.2 * torch.randn(RANK, cols, generator=g)
        tensors[f"{key}.lora_B.weight"] = 0.2 * torch.randn(rows, RANK, generator=g)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft_config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(MLP)}
    (out / "adapter_config.json").write_text(json.dumps(peft_config))
    assert load_file(str(out / "adapter_model.safetensors")).keys() == tensors.keys()
    return out


def _merged(base: Path, adapter: Path, out: Path) -> Path:
    """``base`` with ``adapter`` merged into its weights: W + alpha / r * B A."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out, dirs_exist_ok=True)
    state = load_file(str(out / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for module in MLP:
        key = f"model.layers.0.mlp.{module}"
        a, b = (lora[f"base_model.model.{key}.lora_{h}.weight"] for h in "AB")
        state[f"{key}.weight"] = state[f"{key}.weight"] + ALPHA / RANK * (b @ a)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("mode", ["absorbed-at-load", "mla-disabled"])
def test_the_dense_mlp_adapter_equals_transformers_on_merged_weights(
    mode: str, random_checkpoint: Callable[..., Path]
) -> None:
    base = _v2(random_checkpoint)
    key = {"base": str(base), "rank": RANK, "alpha": ALPHA}
    adapter = cached_build("deepseek-mlp-adapter", key, lambda out: _mlp_adapter(base, out))
    merged = cached_build("deepseek-mlp-merged", key, lambda out: _merged(base, adapter, out))
    reference = hf_greedy(merged, PROMPTS, STEPS)
    assert reference.tokens != hf_greedy(base, PROMPTS, STEPS).tokens  # the adapter matters
    engine = make_engine(base, env=MODES[mode], enable_lora=True, max_model_len=128)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=1)
    lora = LoRARequest("mlp", 1, str(adapter))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params, lora_request=lora)
        engine.add_request(f"plain{i}", prompt, params)  # the same batch, no adapter
    from kvrun.engine.output_accumulator import OutputAccumulator

    accumulator, done = OutputAccumulator(), {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                done[out.request_id] = out.outputs[0]
    plain = hf_greedy(base, PROMPTS, STEPS)
    for i in range(len(PROMPTS)):
        seq = done[f"r{i}"]
        assert list(seq.token_ids) == reference.tokens[i], i
        assert seq.logprobs is not None
        got = [seq.logprobs[s][t].logprob for s, t in enumerate(seq.token_ids)]
        assert got == pytest.approx(reference.chosen_logprobs[i], abs=1e-4), i
        assert list(done[f"plain{i}"].token_ids) == plain.tokens[i], i


@pytest.mark.parametrize("mode", ["absorbed-at-load", "mla-disabled"])
def test_deepseek_v3_mixture_adapters_equal_peft(
    mode: str, random_checkpoint: Callable[..., Path]
) -> None:
    """The mixture layers: an adapter on the shared experts' projections and one on the
    routed experts (peft's target_parameters, each expert's own A and B) beside the
    attention, in one batch with requests that have none: each equals peft's."""
    base = _v3(random_checkpoint)
    adapters = [
        make_adapter(
            base, seed=5, r=4, alpha=8, targets=r".*mlp\.shared_experts\.(gate|up|down)_proj"
        ),
        make_adapter(
            base,
            seed=6,
            r=4,
            alpha=8,
            targets=r".*self_attn\.o_proj",
            target_parameters=("experts.gate_up_proj", "experts.down_proj"),
            std=0.2,
        ),
    ]
    _check(base, adapters, MODES[mode])
