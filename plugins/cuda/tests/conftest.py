"""Fixtures shared by kvrun-cuda's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Where a Triton kernel runs: Triton's interpreter on CPU (TRITON_INTERPRET=1, read
    at each launch), or compiled on the GPU, which skips without one."""
    if request.param == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from kvrun_cuda.triton.launch import compile_blocker  # imports triton

    blocker = compile_blocker()
    if blocker is not None:
        pytest.skip(blocker)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda")
