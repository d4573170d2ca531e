"""The platform under test: found by its entry-point name, probed and constructed once.

The kit reaches a vendor's platform only the way the engine does (entry points in
``kvrun.platform_plugins`` and ``kvrun.plugin_api``), so a platform that passes here
is one the engine can select. Nothing here imports pytest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

from kvrun.attention.base import AttentionBackend
from kvrun.envs import EnvSnapshot, read_env
from kvrun.platforms import Platform, Unavailable
from kvrun.plugins import PLATFORM_GROUP, PluginEntry, find_plugins, probe_platform

__all__ = ["KitTarget", "dtype_name", "load_target"]


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for torch.float32: how test ids and messages name a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KitTarget:
    """What the kit learned about the platform named on the command line."""

    name: str  # the --kvrun-platform value: entry-point name and Platform.name
    entry: PluginEntry | None  # its kvrun.platform_plugins entry; None when not installed
    probe_result: Any  # what the probe returned (class, dotted path, None, Unavailable)
    probe_error: str | None  # "ExcType: message" when importing or calling the probe raised
    platform: Platform | None  # constructed with the environment snapshot; None if unusable
    problem: str | None  # why there is no platform to test; None when there is one

    def require(self) -> Platform:
        """The platform, or an AssertionError saying why the kit cannot test it."""
        if self.platform is None:
            raise AssertionError(
                f"contract: platform {self.name!r} cannot be tested: {self.problem}"
            )
        return self.platform

    # What collection parametrises over; empty when there is no platform.
    @property
    def op_names(self) -> list[str]:
        return sorted(self.platform.ops()) if self.platform is not None else []

    @property
    def backend_names(self) -> list[str]:
        return sorted(self.platform.attention_backends()) if self.platform is not None else []

    @property
    def dtypes(self) -> list[torch.dtype]:
        return list(self.platform.supported_dtypes) if self.platform is not None else []

    def backend_class(self, name: str) -> type[AttentionBackend]:
        return self.require().attention_backends()[name]


def _call_probe(entry: PluginEntry) -> tuple[Any, str | None]:
    try:
        probe: Callable[[], Any] = entry.entry_point.load()
        return probe(), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


@functools.cache
def load_target(name: str) -> KitTarget:
    """Find, probe and construct the platform ``name`` once per process.

    Never raises: whatever goes wrong is recorded for the contract checks to report.
    The platform gets the process's environment snapshot, as the engine would give it.
    """
    entries = [e for e in find_plugins(PLATFORM_GROUP, None) if e.name == name]
    if not entries:
        installed = sorted({ep.name for ep in entry_points(group=PLATFORM_GROUP)})
        missing = (
            f"no entry point named {name!r} in the group {PLATFORM_GROUP!r}; installed: "
            f"{', '.join(installed) or 'none'} (is the distribution installed?)"
        )
        return KitTarget(name, None, None, None, None, missing)
    entry = entries[0]
    result, error = _call_probe(entry)
    info = probe_platform(entry)
    platform: Platform | None = None
    problem = None if info.usable else info.reason
    if info.platform_class is not None:
        try:
            # A conformance run is not usage: it records none.
            env: EnvSnapshot = dataclasses.replace(
                read_env(), VLLM_TARGET_DEVICE=name, VLLM_NO_USAGE_STATS=True
            )
            platform = info.platform_class(env)
        except Exception as exc:
            problem = f"constructing {info.platform_class.__qualname__}(env) raised {exc!r}"
    if isinstance(result, Unavailable) and problem is None:
        problem = result.reason
    return KitTarget(name, entry, result, error, platform, problem)
