"""``quantization="awq"``: AWQ checkpoints of random Llama and Qwen2 models run as stored
on the cpu plugin (csrc/quant.c's int4 kernels, int8 activations per block of 32).

The quantized run's arithmetic differs on purpose from the dequantized one (the
activations' int8 rounding), so its greedy tokens are not asserted equal to
transformers'. What is asserted: every matrix it holds is the checkpoint's, exactly
(its rows dequantize to the dequantized model's weights bit for bit); it holds the
quantized size; and its greedy tokens follow transformers' on the dequantized twin
until a divergence, each divergence at a near-tie of transformers' top two tokens
(measured figures below). ``quantization=None`` on the same checkpoint dequantizes at
load and equals transformers exactly (``tests/test_awq.py``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvrun.engine.llm_engine import LLMEngine
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.loader import load_checkpoint
from kvrun.quantization import plan_quantized_load
from kvrun.sampling_params import SamplingParams
from kvrun_cpu.native import PackedWeight
from kvrun_cpu.native.quantized import QuantizedPackedWeight, quantized_rows
from tests.engine.test_quantized_gguf import first_divergence, prompt_logprobs
from tests.support.engine import hf_greedy, make_engine, run_all
from tests.test_awq import cached_awq_checkpoint

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9],
    list(range(100, 160)),
    [1, 9, 9, 9, 4000, 17, 321],
]
# A divergence is a near-tie of the dequantized run: its top-2 logprobs this close (nats).
NEAR_TIE = 0.5
# (architecture, group size): Llama in groups of 64, Qwen2 (q/k/v biases) of 128.
MODELS = {"llama": 64, "qwen2": 128}
MATRICES = ("qkv", "o", "gate_up", "down")


@pytest.fixture(scope="module", params=sorted(MODELS))
def awq_model(
    request: pytest.FixtureRequest, random_checkpoint: Callable[..., Path]
) -> tuple[str, Path, Path]:
    """(architecture, AWQ checkpoint, plain checkpoint of its dequantized weights)."""
    arch = str(request.param)
    source = random_checkpoint(
        arch, seed=5, init_std=0.1, hidden_size=128, intermediate_size=384, num_layers=2
    )
    awq_dir, plain_dir = cached_awq_checkpoint(source, MODELS[arch])
    return arch, awq_dir, plain_dir


@pytest.fixture(scope="module")
def engines(awq_model: tuple[str, Path, Path]) -> tuple[LLMEngine, LLMEngine]:
    """(quantization="awq", quantization=None) on the AWQ checkpoint."""
    _, awq_dir, _ = awq_model
    return (
        make_engine(awq_dir, quantization="awq", max_model_len=128),
        make_engine(awq_dir, max_model_len=128),
    )


def test_the_matrices_run_as_stored_are_the_checkpoints(
    awq_model: tuple[str, Path, Path], engines: tuple[LLMEngine, LLMEngine]
) -> None:
    """q|k|v and gate|up merged on the packed rows; every row dequantizes to exactly what
    the dequantized model holds; embedding and lm_head (not AWQ layers) stay float."""
    arch, _, _ = awq_model
    quantized, dequantized = engines
    native = quantized.platform.native_kernels()  # type: ignore[attr-defined]
    q_model = quantized.runner.model  # type: ignore[attr-defined]
    d_model = dequantized.runner.model  # type: ignore[attr-defined]
    for q_layer, d_layer in zip(q_model.layers, d_model.layers, strict=True):
        for name in MATRICES:
            q_matrix, d_matrix = getattr(q_layer, name), getattr(d_layer, name)
            assert isinstance(q_matrix, QuantizedPackedWeight), (arch, name)
            assert q_matrix.qtype == f"AWQ_G{MODELS[arch]}"
            assert isinstance(d_matrix, PackedWeight)  # None: dequantized at load
            rows = torch.arange(q_matrix.out_features)
            assert torch.equal(quantized_rows(native, rows, q_matrix), d_matrix.unpack())
    assert isinstance(q_model.embed, PackedWeight) and isinstance(q_model.lm_head, PackedWeight)


def test_the_runner_holds_the_quantized_size(
    awq_model: tuple[str, Path, Path], engines: tuple[LLMEngine, LLMEngine]
) -> None:
    arch, awq_dir, _ = awq_model
    group = MODELS[arch]
    model = engines[0].runner.model  # type: ignore[attr-defined]
    held = values = 0
    for layer in model.layers:
        for name in MATRICES:
            matrix = getattr(layer, name)
            held += matrix.nbytes
            values += matrix.out_features * matrix.in_features
    # 4 bits per value, and per 16 rows and group one 64-byte line of scales and zeros
    assert held * 8 == values * (4 + 512 / (16 * group))
    stored = 0
    with safe_open(str(awq_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle)
            if key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales"):
                tensor = f.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
    # the checkpoint's own tensors: 4 + 20 / group bits per value
    assert stored * 8 == values * (4 + 20 / group)
    assert held / stored < 1 + 0.3 / 4.0  # 4.25 / 4.16 (group 128), 4.5 / 4.31 (64)
    assert held * 7 < values * 4  # float32 would take over seven times as much


def test_greedy_agrees_with_the_dequantized_weights_up_to_near_ties(
    awq_model: tuple[str, Path, Path], engines: tuple[LLMEngine, LLMEngine]
) -> None:
    arch, _, plain_dir = awq_model
    reference = hf_greedy(plain_dir, PROMPTS, NEW_TOKENS)
    # quantization=None is transformers on the dequantized weights, token for token
    dequantized = [o.outputs[0].token_ids for o in run_all(engines[1], PROMPTS, GREEDY)]
    assert dequantized == reference.tokens
    got = [o.outputs[0].token_ids for o in run_all(engines[0], PROMPTS, GREEDY)]
    report: list[tuple[int, int, float | None]] = []
    for i, (tokens, want) in enumerate(zip(got, reference.tokens, strict=True)):
        step = first_divergence(tokens, want)
        if step is None:
            report.append((i, NEW_TOKENS, None))
            continue
        top = reference.top_logprobs[i][step]
        margin = top[0] - top[1]
        report.append((i, step, round(margin, 3)))
        assert tokens[step] in reference.top_ids[i][step][:2], (arch, i, step, report)
        assert margin < NEAR_TIE, (arch, report)
    print(arch, "prompt, first divergence, top-2 margin there:", report)
    # Measured (4 prompts x 24 tokens): llama (group 64) first divergences at steps 5, 4,
    # -, - (two prompts equal throughout), qwen2 (group 128) at 5, 14, 8, 20; margins
    # 0.002-0.043 nats: these random models' choices are near-ties throughout.


def test_prompt_logprobs_stay_within_the_activations_rounding(
    awq_model: tuple[str, Path, Path], engines: tuple[LLMEngine, LLMEngine]
) -> None:
    """The same tokens in both runs, so every position compares. Measured: median 0.017,
    largest 0.065 (llama) and 0.058 (qwen2) nats."""
    arch, _, _ = awq_model
    got, want = prompt_logprobs(engines[0]), prompt_logprobs(engines[1])
    differences = [abs(g - w) for g, w in zip(got, want, strict=True)]
    print(
        arch,
        "prompt logprob differences: median",
        statistics.median(differences),
        "max",
        max(differences),
    )
    assert statistics.median(differences) < 0.05 and max(differences) < 0.25, differences


def test_awq_needs_an_awq_checkpoint(random_checkpoint: Callable[..., Path]) -> None:
    plain = random_checkpoint(
        "llama", seed=5, init_std=0.1, hidden_size=128, intermediate_size=384, num_layers=2
    )
    with pytest.raises(ConfigError, match=r"quantization='awq' but .* is not an AWQ checkpoint"):
        make_engine(plain, quantization="awq", max_model_len=128)


def test_groups_that_are_not_whole_blocks_are_dequantized_with_a_log_line(
    random_checkpoint: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    source = random_checkpoint("llama", seed=11, init_std=0.3, num_layers=2)
    awq_dir, plain_dir = cached_awq_checkpoint(source, 16)
    with caplog.at_level(logging.INFO, logger="kvrun.engine"):
        engine = make_engine(awq_dir, quantization="awq", max_model_len=128)
    assert "quantization='awq': 0 AWQ matrices run as stored (group size 16); 14 dequantized" in (
        caplog.text
    )
    layer = engine.runner.model.layers[0]  # type: ignore[attr-defined]
    assert isinstance(layer.qkv, PackedWeight)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = hf_greedy(plain_dir, PROMPTS[:2], 8).tokens
    assert [o.outputs[0].token_ids for o in run_all(engine, PROMPTS[:2], greedy)] == expected


def test_a_platform_without_awq_kernels_dequantizes_with_a_log_line(
    awq_model: tuple[str, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cuda = pytest.importorskip("kvrun_cuda.platform")
    _, awq_dir, _ = awq_model
    checkpoint = load_checkpoint(str(awq_dir), hf_hub_offline=True, use_modelscope=False)
    platform = cuda.CudaPlatform(read_env({}))
    with caplog.at_level(logging.INFO, logger="kvrun.engine"):
        assert plan_quantized_load("awq", checkpoint, model=None, platform=platform) == set()
    assert (
        "quantization='awq': the cuda platform has no AWQ kernels; the AWQ weights are "
        "dequantized at load" in caplog.text
    )
