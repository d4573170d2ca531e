"""kvrun-cpu: the CPU platform plugin."""

from __future__ import annotations

__all__ = ["probe"]


def probe() -> str:
    """A CPU is always there: the platform class, by dotted path (imported only if selected)."""
    return "kvrun_cpu.platform.CpuPlatform"
