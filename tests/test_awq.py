"""AWQ checkpoints (kvrun.loader.awq): the packed format, and a quantised model end to end.

The AWQ checkpoint is written here from a random Llama by a packer that follows
AutoAWQ's GEMM layout (nibble n of a word holds column 8 j + (0, 2, 4, 6, 1, 3, 5, 7)[n]).
The oracle is transformers on a plain checkpoint holding the same dequantised weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvrun.errors import ModelLoadError
from kvrun.loader import load_checkpoint
from kvrun.loader.awq import check_awq_shapes
from kvrun.ops.reference import awq_dequantize, unpack_awq
from kvrun.sampling_params import SamplingParams
from tests.support.checkpoints import cached_build
from tests.support.engine import hf_greedy, make_engine, run_all

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GROUP = 32
QUANTISED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 140))]


def pack(values: torch.Tensor) -> torch.Tensor:
    """int [r, c] of 0..15 -> int32 [r, c / 8], one word at a time as AutoAWQ packs."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for j in range(cols // 8):
        for n, col in enumerate(ORDER):
            out[:, j] |= values[:, 8 * j + col].long() << (4 * n)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # two's complement


def quantise(
    weight: torch.Tensor, group: int = GROUP
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AWQ tensors of one [out, in] weight (asymmetric, ``group`` rows of W^T per group),
    and the float32 weight they dequantise to."""
    wt = weight.t().float()  # [in, out]
    groups = wt.reshape(-1, group, wt.shape[1])
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((high - low) / 15).clamp(min=1e-5).half()
    zeros = (-low / scales.float()).round().clamp(0, 15)
    q = (groups / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15)
    q = q.reshape(wt.shape).int()
    z = zeros.int()
    rows = torch.arange(wt.shape[0]) // group
    dequantised = ((q - z[rows]).float() * scales.float()[rows]).t().contiguous()
    return {"qweight": pack(q), "qzeros": pack(z), "scales": scales}, dequantised


def test_unpack_is_the_inverse_of_autoawq_packing() -> None:
    values = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    packed = pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    assert torch.equal(unpack_awq(packed), values.int())
    # column 1 lives in nibble 4, column 2 in nibble 1 (the GEMM interleave)
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 1] = 7
    assert int(pack(one)[0, 0]) == 7 << 16


def test_dequantize_uses_each_groups_scale_and_zero() -> None:
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    parts, expected = quantise(weight)
    got = awq_dequantize(parts["qweight"], parts["qzeros"], parts["scales"], GROUP)
    assert got.shape == (16, 64) and torch.equal(got, expected)
    assert (got - weight).abs().max() < 0.2  # and it is a quantisation of the weight
    check_awq_shapes(parts["qweight"], parts["qzeros"], parts["scales"], GROUP)
    with pytest.raises(ValueError, match=r"needs qzeros \(2, 2\) and scales \(2, 16\)"):
        check_awq_shapes(parts["qweight"], parts["qzeros"][:1], parts["scales"], GROUP)
    with pytest.raises(ValueError, match="must be 2-d int32"):
        check_awq_shapes(parts["qweight"].long(), parts["qzeros"], parts["scales"], GROUP)
    # group_size -1: one group of every input row
    one_group = awq_dequantize(parts["qweight"], parts["qzeros"][:1], parts["scales"][:1], -1)
    rows = torch.zeros(64, dtype=torch.long)
    q, z = unpack_awq(parts["qweight"]), unpack_awq(parts["qzeros"][:1])
    assert torch.equal(one_group, ((q - z[rows]).float() * parts["scales"][:1].float()[rows]).t())


def write_awq_checkpoint(
    source: Path, awq_dir: Path, plain_dir: Path, group: int = GROUP
) -> tuple[Path, Path]:
    """From a random float checkpoint: (an AWQ checkpoint of its QUANTISED projections
    in groups of ``group`` input rows, a plain fp32 checkpoint of the weights those
    dequantise to)."""
    for d in (awq_dir, plain_dir):
        for f in source.iterdir():
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy(f, d / f.name)
    weights = load_file(str(source / "model.safetensors"))
    awq: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in QUANTISED:
            parts, dequantised = quantise(tensor, group)
            awq.update({f"{prefix}.{k}": v for k, v in parts.items()})
            plain[name] = dequantised
        else:
            awq[name] = plain[name] = tensor
    save_file(awq, str(awq_dir / "model.safetensors"))
    save_file(plain, str(plain_dir / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
    }
    (awq_dir / "config.json").write_text(json.dumps(config))
    return awq_dir, plain_dir


def cached_awq_checkpoint(source: Path, group: int = GROUP) -> tuple[Path, Path]:
    """write_awq_checkpoint's pair for (``source``, ``group``), built once and kept under
    $KVRUN_TEST_CACHE: stable paths, so the transformers references of the plain twin
    (hf_greedy, keyed by its directory) are cached across runs too. The key holds the
    writer's own source, so a change to the packer builds the pair anew."""

    def build(out: Path) -> Path:
        (out / "awq").mkdir()
        (out / "plain").mkdir()
        write_awq_checkpoint(source, out / "awq", out / "plain", group)
        return out

    writer = "".join(inspect.getsource(f) for f in (pack, quantise, write_awq_checkpoint))
    key = {
        "source": str(source),
        "group": group,
        "writer": hashlib.sha256(writer.encode()).hexdigest()[:16],
    }
    root = cached_build("awq-pair", key, build)
    return root / "awq", root / "plain"


@pytest.fixture(scope="module")
def awq_and_plain(random_checkpoint: Callable[..., Path]) -> tuple[Path, Path]:
    """(AWQ checkpoint, plain fp32 checkpoint of its dequantised weights), one random Llama."""
    source = random_checkpoint("llama", seed=11, init_std=0.3, num_layers=2)
    return cached_awq_checkpoint(source)


def test_an_awq_checkpoint_generates_as_its_dequantised_weights(
    awq_and_plain: tuple[Path, Path],
) -> None:
    awq_dir, plain_dir = awq_and_plain
    expected = hf_greedy(plain_dir, PROMPTS, 12).tokens
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = run_all(make_engine(awq_dir, max_model_len=128), PROMPTS, greedy)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def _with_config(awq_dir: Path, tmp_path: Path, **changes: object) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(awq_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"].update(changes)
    (broken / "config.json").write_text(json.dumps(config))
    return broken


def test_unsupported_quantisations_are_refused_by_name(
    awq_and_plain: tuple[Path, Path], tmp_path: Path
) -> None:
    awq_dir, _ = awq_and_plain
    gptq = _with_config(awq_dir, tmp_path, quant_method="gptq")
    with pytest.raises(ModelLoadError, match="quant_method 'gptq'; kvrun loads AWQ"):
        make_engine(gptq, max_model_len=128)
    # refused when the checkpoint is resolved, before a model is built or a weight read
    with pytest.raises(ModelLoadError, match="quant_method 'gptq'; kvrun loads AWQ"):
        load_checkpoint(str(gptq), hf_hub_offline=True, use_modelscope=False)
    shutil.rmtree(gptq)
    eight_bit = _with_config(awq_dir, tmp_path, bits=8, version="gemv")
    with pytest.raises(ModelLoadError, match=r"bits=8 \(accepted: 4\); version='gemv'"):
        make_engine(eight_bit, max_model_len=128)


def test_a_layer_missing_a_part_names_the_layer(
    awq_and_plain: tuple[Path, Path], tmp_path: Path
) -> None:
    awq_dir, _ = awq_and_plain
    broken = tmp_path / "broken"
    shutil.copytree(awq_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.qzeros"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(
        ModelLoadError, match=r"AWQ layer model\.layers\.1\.mlp\.down_proj has no qzeros"
    ):
        make_engine(broken, max_model_len=128)
