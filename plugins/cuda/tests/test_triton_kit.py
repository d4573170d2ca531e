"""The conformance kit's op and attention checks on our Triton kernels, in the interpreter.

The kit (kvrun.testing) is what a vendor runs on its hardware; test_cuda_conformance
runs it on a GPU. Here its checks run on CPU through Triton's interpreter, so its
poisoned caches (NaN in every slot a kernel must not read) and its multi-step
scenarios (chunked prefill, prefix hits) exercise the kernels in every CI run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.attention.base import AttentionLayerSpec
from kvrun.ops import reference_ops
from kvrun.testing.attention_checks import (
    LATENT_SPECS,
    LAYER_SPECS,
    SCENARIOS,
    Scenario,
    check_backend,
)
from kvrun.testing.op_checks import OP_CASES, OpCase, check_op
from kvrun_cuda.triton.attention import TritonAttention
from kvrun_cuda.triton.ops import triton_ops

DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 wrong
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# Only the ops Triton overrides (linear stays the reference, cuBLAS on a GPU).
TRITON_CASES = [c for c in OP_CASES if c.op in triton_ops()]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"{c.op}-{c.label}" for c in TRITON_CASES])
def test_kit_op_checks(case: OpCase, dtype: torch.dtype) -> None:
    check_op(case, reference_ops().with_overrides(triton_ops(), "triton"), dtype, CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
@pytest.mark.parametrize(("label", "spec"), LAYER_SPECS, ids=[label for label, _ in LAYER_SPECS])
def test_kit_attention_scenarios(
    label: str, spec: AttentionLayerSpec, scenario: Scenario, dtype: torch.dtype
) -> None:
    check_backend(TritonAttention(spec), scenario, dtype, CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
@pytest.mark.parametrize(("label", "spec"), LATENT_SPECS, ids=[label for label, _ in LATENT_SPECS])
def test_kit_latent_cache_scenarios(
    label: str, spec: AttentionLayerSpec, scenario: Scenario, dtype: torch.dtype
) -> None:
    # One plane per layer, read as keys and as values (DeepSeek's latent cache).
    check_backend(TritonAttention(spec), scenario, dtype, CPU)
