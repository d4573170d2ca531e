"""fp8 block-quantized checkpoints (DeepSeek-V3's format) dequantized at load, and
VLLM_MLA_DISABLE_REQUANTIZATION.

The checkpoints are written here from random fp32 ones: every linear layer's weight
quantized to float8_e4m3fn with one float32 ``weight_scale_inv`` per block (embeddings,
norms, the router and the lm_head stay float32, as DeepSeek ships them). The oracle is
transformers: on the fp8 file itself (its CPU path dequantizes) for a Llama whose
matrices are whole blocks, and on the dequantized float32 weights for DeepSeek-V3 (its
CPU dequantization infers the block from the scale grid, wrong where a matrix ends in a
partial block, as kv_a_proj_with_mqa's 40 rows do here and 576 do in DeepSeek-V3).
With MLA absorption at load and requantization on (vLLM's default) the absorbed matrices
are rounded onto the fp8 grid, so the output moves off the oracle on purpose: the test
measures it and checks that tokens differ only where the oracle's top two were near-tied.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.errors import ConfigError, ModelLoadError
from kvrun.loader import load_checkpoint
from kvrun.loader.fp8 import (
    FP8_MAX,
    dequantize_fp8_blocks,
    fp8_config,
    quantize_to_fp8_blocks,
    round_to_fp8_blocks,
)
from kvrun.models.config import ModelConfig
from kvrun.models.deepseek import DeepseekV3ForCausalLM
from kvrun.ops import reference_ops
from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_deepseek_v3 import V3
from tests.support.checkpoints import cached_build
from tests.support.engine import Reference, hf_greedy, make_engine, run_all

NEW_TOKENS = 16
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314],
    [1, 2683, 253, 1341, 411, 7093, 30, 378, 5353, 314, 260, 1003, 9],
    list(range(100, 140)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
BLOCK = (32, 32)
QUANT = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_block_size": list(BLOCK),
    "activation_scheme": "dynamic",
}


def _quantized(name: str, tensor: torch.Tensor) -> bool:
    """The tensors DeepSeek's fp8 checkpoints store as fp8: every linear layer's weight
    except the embeddings, the lm_head and the router."""
    return (
        tensor.dim() == 2
        and name.endswith(".weight")
        and "embed_tokens" not in name
        and not name.startswith("lm_head")
        and not name.endswith("mlp.gate.weight")
    )


def _write_fp8(source: Path, out: Path, *, dequantized: bool) -> Path:
    """``source``'s weights quantized per block (an fp8 checkpoint), or the same values
    dequantized to float32 (``dequantized``: the oracle's plain checkpoint)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, dirs_exist_ok=True)
    state = load_file(str(out / "model.safetensors"))
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not _quantized(name, tensor):
            stored[name] = tensor
            continue
        q, scale_inv = quantize_to_fp8_blocks(tensor, BLOCK)
        if dequantized:
            stored[name] = dequantize_fp8_blocks(q, scale_inv, BLOCK)
        else:
            stored[name] = q
            stored[name.removesuffix("weight") + "weight_scale_inv"] = scale_inv
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    if not dequantized:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = QUANT
        (out / "config.json").write_text(json.dumps(config))
    return out


def _pair(source: Path) -> tuple[Path, Path]:
    """(fp8 checkpoint, its dequantized float32 twin), cached."""
    key = {"source": str(source), "block": list(BLOCK)}
    return (
        cached_build("fp8", key, lambda out: _write_fp8(source, out, dequantized=False)),
        cached_build("fp8-dequantized", key, lambda out: _write_fp8(source, out, dequantized=True)),
    )


def _deepseek(random_checkpoint: Callable[..., Path]) -> tuple[Path, Path]:
    return _pair(_deepseek_source(random_checkpoint))


def _llama(random_checkpoint: Callable[..., Path]) -> tuple[Path, Path]:
    # every matrix whole 32x32 blocks (64 hidden, 2 x 16 kv rows, 128 intermediate)
    return _pair(random_checkpoint("llama", seed=3, init_std=0.2, num_layers=2))


def _outputs(engine: Any) -> tuple[list[list[int]], list[list[float]]]:
    outs = run_all(engine, PROMPTS, GREEDY)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = []
    for o in outs:
        seq = o.outputs[0]
        assert seq.logprobs is not None
        logprobs.append([seq.logprobs[i][t].logprob for i, t in enumerate(seq.token_ids)])
    return tokens, logprobs


def _assert_equal(engine: Any, reference: Reference) -> None:
    _assert_outputs_equal(_outputs(engine), reference)


def _assert_outputs_equal(
    outputs: tuple[list[list[int]], list[list[float]]], reference: Reference
) -> None:
    tokens, logprobs = outputs
    assert tokens == reference.tokens
    for i, row in enumerate(logprobs):
        assert row == pytest.approx(reference.chosen_logprobs[i], abs=1e-4), i


# the dequantization ----------------------------------------------------------------------
def test_blockwise_dequantization_scales_each_block_including_partial_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 70, generator=generator).to(torch.float8_e4m3fn)
    scales = torch.rand(2, 3, generator=generator) + 0.5
    out = dequantize_fp8_blocks(weight, scales, BLOCK)
    for r in range(40):
        for c in range(0, 70, 7):
            assert out[r, c] == weight[r, c].float() * scales[r // 32, c // 32]
    with pytest.raises(ValueError, match=r"needs weight_scale_inv \(2, 3\); got \(2, 2\)"):
        dequantize_fp8_blocks(weight, scales[:, :2], BLOCK)


def test_quantizing_puts_each_block_on_the_e4m3_grid_with_its_max_at_448() -> None:
    weight = torch.randn(40, 70, generator=torch.Generator().manual_seed(1))
    q, scale_inv = quantize_to_fp8_blocks(weight, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and tuple(scale_inv.shape) == (2, 3)
    assert float(q[:32, :32].float().abs().max()) == FP8_MAX
    rounded = dequantize_fp8_blocks(q, scale_inv, BLOCK)
    assert torch.allclose(rounded, weight, rtol=2**-4, atol=float(scale_inv.max()) * 2**-6)
    assert not torch.equal(rounded, weight)
    # a matrix on the grid stays there
    assert torch.allclose(round_to_fp8_blocks(rounded, BLOCK), rounded, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fmt": "e5m2"}, "fmt='e5m2' (accepted: 'e4m3')"),
        ({"activation_scheme": "static"}, "activation_scheme='static' (accepted: 'dynamic')"),
        ({"weight_block_size": None}, "no weight_block_size: per-tensor fp8 scales"),
        ({"weight_block_size": [128]}, "weight_block_size=[128] (accepted: two positive"),
    ],
)
def test_an_fp8_config_kvrun_cannot_load_is_refused_by_name(
    settings: dict[str, Any], message: str
) -> None:
    config = {"quantization_config": {**QUANT, **settings}}
    with pytest.raises(ModelLoadError, match="fp8 checkpoint kvrun cannot load") as info:
        fp8_config(config, "m")
    assert message in str(info.value)
    assert fp8_config({"quantization_config": QUANT}, "m") is not None
    assert fp8_config({}, "m") is None


def test_a_layer_without_its_scales_is_a_damaged_checkpoint(
    random_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    fp8_dir, _ = _llama(random_checkpoint)
    damaged = tmp_path / "damaged"
    shutil.copytree(fp8_dir, damaged)
    state = load_file(str(damaged / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(state, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = load_checkpoint(str(damaged), hf_hub_offline=True, use_modelscope=False)
    with pytest.raises(ModelLoadError, match=r"fp8 layer model\.layers\.1\.mlp\.down_proj has no"):
        list(checkpoint.iter_weights(torch.float32, progress=False))


# whole models against transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_llama_outputs(
    random_checkpoint: Callable[..., Path],
) -> tuple[list[list[int]], list[list[float]]]:
    """The fp8 Llama's greedy tokens and logprobs, quantization unset (one engine for
    the two tests below)."""
    fp8_dir, _ = _llama(random_checkpoint)
    return _outputs(make_engine(fp8_dir, max_model_len=128))


def test_an_fp8_llama_matches_transformers_loading_the_fp8_file(
    random_checkpoint: Callable[..., Path],
    fp8_llama_outputs: tuple[list[list[int]], list[list[float]]],
) -> None:
    """transformers dequantizes the fp8 file itself (its CPU path) as the oracle, and its
    answer equals the one on the dequantized float32 twin."""
    fp8_dir, plain_dir = _llama(random_checkpoint)
    reference = hf_greedy(fp8_dir, PROMPTS, NEW_TOKENS)
    assert hf_greedy(plain_dir, PROMPTS, NEW_TOKENS).tokens == reference.tokens
    _assert_outputs_equal(fp8_llama_outputs, reference)


def test_quantization_fp8_names_an_fp8_checkpoint_and_refuses_a_float_one(
    random_checkpoint: Callable[..., Path],
    fp8_llama_outputs: tuple[list[list[int]], list[list[float]]],
) -> None:
    """vLLM's quantization='fp8' on an fp8 checkpoint: dequantized at load, the same
    tokens and logprobs as leaving it unset; on a float checkpoint vLLM would quantize
    online, which kvrun refuses by name."""
    fp8_dir, plain_dir = _llama(random_checkpoint)
    named = _outputs(make_engine(fp8_dir, max_model_len=128, quantization="fp8"))
    assert named == fp8_llama_outputs
    with pytest.raises(ConfigError, match=r"quantization='fp8' but .* has no fp8 weights"):
        make_engine(plain_dir, max_model_len=128, quantization="fp8")


FULL_PRECISION_MODES = {
    "mla-disabled": {"VLLM_MLA_DISABLE": "1"},
    "absorbed-per-step": {"VLLM_MLA_PERFORM_MATRIX_ABSORPTION": "0"},
    "absorbed-at-load-not-requantized": {"VLLM_MLA_DISABLE_REQUANTIZATION": "1"},
}


@pytest.mark.parametrize("mode", list(FULL_PRECISION_MODES))
def test_an_fp8_deepseek_v3_matches_transformers_on_the_dequantized_weights(
    mode: str, random_checkpoint: Callable[..., Path]
) -> None:
    fp8_dir, plain_dir = _deepseek(random_checkpoint)
    reference = hf_greedy(plain_dir, PROMPTS, NEW_TOKENS)
    _assert_equal(
        make_engine(fp8_dir, env=FULL_PRECISION_MODES[mode], max_model_len=128), reference
    )


# With requantization the output moves on purpose. Measured (seed 11, these prompts):
# the prompts' next-token logprobs move by at most 0.23 where fp8-rounding the
# checkpoint itself moved them by 0.65 (random weights of std 0.3 are very sensitive).
TOP = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=8)


def _top_logprobs(engine: Any) -> list[list[dict[int, float]]]:
    """[prompt][step] {token id: logprob} of the 8 most likely tokens."""
    outs = run_all(engine, PROMPTS, TOP)
    rows = []
    for o in outs:
        assert o.outputs[0].logprobs is not None
        rows.append([{k: v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs])
    return rows


def _moved(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a if k in b)


def test_requantized_absorbed_matrices_cost_less_than_the_checkpoints_own_rounding(
    random_checkpoint: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Against the oracle (the dequantized weights, full precision): every prompt's
    next-token logprobs move less than fp8-rounding the checkpoint moved them (original
    float32 weights against dequantized), and greedy continuations agree up to a step
    where the oracle's top two were nearer than twice what requantization moves."""
    fp8_dir, plain_dir = _deepseek(random_checkpoint)
    with caplog.at_level(logging.INFO, logger="kvrun.models.deepseek"):
        engine = make_engine(fp8_dir, max_model_len=128)
    assert "rounded back onto the fp8 32x32 block grid" in caplog.text
    requantized = _top_logprobs(engine)
    exact = _top_logprobs(
        make_engine(fp8_dir, env={"VLLM_MLA_DISABLE_REQUANTIZATION": "1"}, max_model_len=128)
    )
    original = _top_logprobs(make_engine(_deepseek_source(random_checkpoint), max_model_len=128))
    requantization = max(_moved(r[0], e[0]) for r, e in zip(requantized, exact))
    checkpoint_rounding = max(_moved(o[0], e[0]) for o, e in zip(original, exact))
    with capsys.disabled():
        print(
            f"\nfp8 MLA requantization moves next-token logprobs by <= {requantization:.3f}; "
            f"the checkpoint's own fp8 rounding by {checkpoint_rounding:.3f}"
        )
    assert 1e-4 < requantization < checkpoint_rounding
    reference = hf_greedy(plain_dir, PROMPTS, NEW_TOKENS)
    for i, (steps, oracle_steps) in enumerate(zip(requantized, exact)):
        for step, (got, want) in enumerate(zip(steps, oracle_steps)):
            token, oracle_token = max(got, key=got.__getitem__), reference.tokens[i][step]
            if token != oracle_token:
                gap = reference.top_logprobs[i][step][0] - reference.top_logprobs[i][step][1]
                assert gap < 2 * requantization, (i, step, gap)
                break  # after a divergence the contexts differ
            assert _moved(got, want) <= 2 * requantization, (i, step)


def _deepseek_source(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint(
        "deepseek_v3",
        seed=11,
        init_std=0.3,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        extra_config=V3,
    )


def _absorbed_model(fp8_dir: Path, requantize: bool) -> DeepseekV3ForCausalLM:
    """The model built and loaded with the reference ops (which keep matrices as plain
    tensors), absorbed at load, requantizing or not."""
    checkpoint = load_checkpoint(str(fp8_dir), hf_hub_offline=True, use_modelscope=False)
    config = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    config = replace(config, mla_requantize=requantize)
    model = DeepseekV3ForCausalLM(config, reference_ops(), None, torch.float32, torch.device("cpu"))  # type: ignore[arg-type]
    model.load_weights(checkpoint.iter_weights(torch.float32, progress=False), str(fp8_dir))
    return model


def test_the_absorbed_matrices_lie_on_the_fp8_grid_unless_requantization_is_disabled(
    random_checkpoint: Callable[..., Path],
) -> None:
    fp8_dir, _ = _deepseek(random_checkpoint)
    on_grid, full = _absorbed_model(fp8_dir, True), _absorbed_model(fp8_dir, False)
    assert on_grid.config.fp8_weight_block == BLOCK
    for requantized, plain in zip(on_grid.layers, full.layers):
        for name in ("q_latent", "o_latent"):
            a, b = getattr(requantized, name), getattr(plain, name)
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            assert torch.allclose(round_to_fp8_blocks(a, BLOCK), a, rtol=1e-6, atol=0), name
            assert not torch.allclose(round_to_fp8_blocks(b, BLOCK), b, rtol=1e-3, atol=0), name
            assert torch.equal(a, round_to_fp8_blocks(b, BLOCK)), name


@pytest.mark.parametrize(
    ("model", "env", "why"),
    [
        ("llama-fp8", {}, "LlamaForCausalLM has no latent attention"),
        ("deepseek-plain", {}, "the checkpoint's weights are not fp8"),
        ("deepseek-fp8", {"VLLM_MLA_PERFORM_MATRIX_ABSORPTION": "0"}, "not absorbed at load"),
    ],
)
def test_disabling_requantization_where_nothing_is_requantized_is_named(
    model: str,
    env: dict[str, str],
    why: str,
    random_checkpoint: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = {
        "llama-fp8": lambda: _llama(random_checkpoint)[0],
        "deepseek-plain": lambda: _deepseek(random_checkpoint)[1],
        "deepseek-fp8": lambda: _deepseek(random_checkpoint)[0],
    }[model]()
    with caplog.at_level(logging.WARNING, logger="kvrun.engine"):
        make_engine(
            directory,
            env={**env, "VLLM_MLA_DISABLE_REQUANTIZATION": "1"},
            max_model_len=64,
            num_kv_blocks=8,
        )
    assert "VLLM_MLA_DISABLE_REQUANTIZATION=1 has no effect" in caplog.text
    assert why in caplog.text
