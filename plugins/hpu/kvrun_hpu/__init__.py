"""kvrun-hpu: the Intel Gaudi platform plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.platforms import Unavailable

__all__ = ["probe"]


def probe() -> str | Unavailable:
    """Usable when habana_frameworks imports and finds a Gaudi device."""
    from kvrun.platforms import Unavailable

    try:
        import habana_frameworks.torch.hpu as hthpu
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in (
            "habana_frameworks",
            "habana_frameworks.torch",
        ):
            return Unavailable(
                "habana_frameworks is not installed: the Intel Gaudi software stack comes "
                "from Intel's Gaudi installer or Docker images, not PyPI"
            )
        return Unavailable(f"habana_frameworks is installed but cannot be imported: {exc}")
    if not hthpu.is_available():
        return Unavailable(
            "habana_frameworks finds no Gaudi device "
            "(habana_frameworks.torch.hpu.is_available() is False)"
        )
    return "kvrun_hpu.platform.HpuPlatform"
