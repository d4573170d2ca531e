"""kvrun-cuda: the NVIDIA GPU platform plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.platforms import Unavailable

__all__ = ["probe"]


def probe() -> str | Unavailable:
    """Usable when a CUDA build of torch (not ROCm) sees at least one NVIDIA GPU."""
    from kvrun.platforms import Unavailable

    try:
        import torch
    except ImportError as exc:
        return Unavailable(f'torch cannot be imported ({exc}): pip install "kvrun[cuda]"')
    if torch.version.hip is not None:
        return Unavailable(
            f"torch {torch.__version__} is a ROCm build (torch.version.hip is "
            f"{torch.version.hip}); the rocm plugin drives it"
        )
    if torch.version.cuda is None:
        return Unavailable(
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        )
    if not torch.cuda.is_available():
        return Unavailable(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no NVIDIA GPU "
            "(torch.cuda.is_available() is False; check the driver and CUDA_VISIBLE_DEVICES)"
        )
    return "kvrun_cuda.platform.CudaPlatform"
