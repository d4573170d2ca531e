"""VLLM_USE_FLASHINFER_SAMPLER: FlashInfer's top-k/top-p sampling kernel, when asked.

Unset means "when FlashInfer is installed"; 1 without FlashInfer is an error; 0
keeps the core's torch sampler. ``CudaPlatform.top_k_top_p_sampler`` hands the
adapted kernel to the core's Sampler, which uses it for unseeded rows without min_p.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvrun.errors import ConfigError
from kvrun_cuda.backends import module_installed

__all__ = ["flashinfer_sampler", "flashinfer_top_k_top_p"]


def flashinfer_sampler(
    use: bool | None, installed: Callable[[str], bool] = module_installed
) -> tuple[Callable[..., Any] | None, str]:
    """FlashInfer's ``top_k_top_p_sampling_from_logits`` or None, and why."""
    if use is False:
        return None, "VLLM_USE_FLASHINFER_SAMPLER=0: the torch sampler runs"
    if not installed("flashinfer"):
        if use:
            raise ConfigError(
                "VLLM_USE_FLASHINFER_SAMPLER=1 needs flashinfer-python, which is not "
                "installed (pip install flashinfer-python); unset it or set it to 0"
            )
        return None, "FlashInfer is not installed: the torch sampler runs"
    import flashinfer.sampling

    fn: Callable[..., Any] = flashinfer.sampling.top_k_top_p_sampling_from_logits
    return fn, "FlashInfer's top-k/top-p sampling kernel"


def flashinfer_top_k_top_p(
    fn: Callable[..., Any],
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlashInfer's kernel under the core's TopKTopPSampler contract.

    The core says "keep all" with top_k 0; FlashInfer wants a k, so 0 becomes the
    vocabulary size. FlashInfer takes int32 k and returns int32 ids.
    """

    def sample(
        logits: torch.Tensor,  # [R, V] float32, divided by temperature
        top_k: torch.Tensor,  # [R] int64, 0 = keep all
        top_p: torch.Tensor,  # [R] float32, 1.0 = keep all
    ) -> torch.Tensor:  # [R] int64
        k = torch.where(top_k > 0, top_k, logits.shape[1]).to(torch.int32)
        ids: torch.Tensor = fn(logits, k, top_p)
        return ids.long()

    return sample
