"""kvrun-openvino: the Intel OpenVINO platform plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrun.platforms import Unavailable

__all__ = ["PROBE_DEVICE", "probe"]

# Probes take no arguments and only kvrun.envs reads the environment, so the probe
# checks VLLM_OPENVINO_DEVICE's default; OpenvinoPlatform.setup_process checks the
# device the user actually configured once it has the environment snapshot.
PROBE_DEVICE = "CPU"


def probe() -> str | Unavailable:
    """Usable when openvino imports and its runtime offers the default CPU device."""
    from kvrun.platforms import Unavailable

    try:
        import openvino
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "openvino":
            return Unavailable('openvino is not installed: pip install "kvrun[openvino]"')
        return Unavailable(f"openvino is installed but cannot be imported: {exc}")
    try:
        devices = list(openvino.Core().available_devices)
    except RuntimeError as exc:
        return Unavailable(f"the OpenVINO {openvino.get_version()} runtime failed: {exc}")
    if PROBE_DEVICE not in devices:
        return Unavailable(
            f"OpenVINO {openvino.get_version()} offers devices {devices}, not {PROBE_DEVICE}"
        )
    return "kvrun_openvino.platform.OpenvinoPlatform"
