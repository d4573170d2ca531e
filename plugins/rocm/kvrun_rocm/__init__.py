"""kvrun-rocm: the AMD GPU platform plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.platforms import Unavailable

__all__ = ["probe"]


def probe() -> str | Unavailable:
    """Usable when a ROCm build of torch sees at least one AMD GPU."""
    from kvrun.platforms import Unavailable

    try:
        import torch
    except ImportError as exc:
        return Unavailable(f'torch cannot be imported ({exc}): pip install "kvrun[rocm]"')
    if torch.version.hip is None:
        return Unavailable(
            f"torch {torch.__version__} is not a ROCm build (torch.version.hip is None)"
        )
    # ROCm builds of torch expose HIP devices through the torch.cuda API.
    if not torch.cuda.is_available():
        return Unavailable(
            f"torch {torch.__version__} (HIP {torch.version.hip}) sees no AMD GPU "
            "(torch.cuda.is_available() is False; check /dev/kfd and HIP_VISIBLE_DEVICES)"
        )
    return "kvrun_rocm.platform.RocmPlatform"
