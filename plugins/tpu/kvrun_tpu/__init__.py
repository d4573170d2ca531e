"""kvrun-tpu: the Google TPU platform plugin (PyTorch/XLA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.platforms import Unavailable

__all__ = ["probe"]


def probe() -> str | Unavailable:
    """Usable when torch_xla imports and its PJRT runtime runs on a TPU."""
    from kvrun.platforms import Unavailable

    try:
        import torch_xla
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "torch_xla":
            return Unavailable('torch_xla is not installed: pip install "kvrun[tpu]"')
        # Usually a torch / torch_xla version mismatch (undefined symbols).
        return Unavailable(f"torch_xla is installed but cannot be imported: {exc}")
    version = getattr(torch_xla, "__version__", "?")
    try:
        import torch_xla.runtime as xr

        # PJRT picks TPU by itself when libtpu and a TPU chip are present.
        device = xr.device_type()
    except Exception as exc:
        return Unavailable(f"torch_xla {version} found no XLA device: {type(exc).__name__}: {exc}")
    if device != "TPU":
        return Unavailable(
            f"torch_xla {version} runs on PJRT device {device!r}, not a TPU "
            "(no TPU chip, or libtpu missing)"
        )
    return "kvrun_tpu.platform.TpuPlatform"
