"""The platform under test: found by its entry-point name, probed and constructed once.

The kit reaches a vendor's platform the way the engine does (entry points in
``kvrun.platform_plugins`` and ``kvrun.plugin_api``), so a platform that passes here
is one the engine can select. The one exception is opt-in: a platform class path
(``--kvrun-platform-class=pkg.mod:Class``) constructs the class without asking its
probe, for a simulator or a CPU build of a device whose probe rightly says no. The
probe is still called and checked; only its verdict is not needed. Nothing here
imports pytest.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

from kvrun.attention.base import AttentionBackend
from kvrun.envs import EnvSnapshot, read_env
from kvrun.platforms import Platform, Unavailable
from kvrun.plugins import PLATFORM_GROUP, PluginEntry, find_plugins, probe_platform

__all__ = ["KitTarget", "dtype_name", "import_platform_class", "load_target"]


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
    # why there is no platform to test (or, built from a class path, what its contract
    # lacks); None when all is well
    problem: str | None
    # "pkg.mod:Class" when the platform was built from a class path, bypassing the probe's
    # verdict (the engine, which selects only through probes, cannot select it then).
    class_path: str | None = None

    @property
    def engine_can_select(self) -> bool:
        """Whether LLMEngine reaches this platform: its probe named a usable class."""
        return self.class_path is None or self.probe_usable

    @property
    def probe_usable(self) -> bool:
        result = self.probe_result
        return (
            self.probe_error is None and result is not None and not isinstance(result, Unavailable)
        )

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


def import_platform_class(path: str) -> type[Platform]:
    """The Platform subclass at ``pkg.mod:Class`` (or ``pkg.mod.Class``).

    Raises ValueError naming the path and what is accepted.
    """
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (module_name and sep and attr):
        raise ValueError(f"platform class path {path!r} is not of the form 'package.module:Class'")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"platform class path {path!r} cannot be imported: {exc!r}") from exc
    if not (isinstance(found, type) and issubclass(found, Platform)):
        raise ValueError(
            f"platform class path {path!r} names {found!r}, not a kvrun.platforms.Platform subclass"
        )
    return found


def _class_target(path: str, env: EnvSnapshot) -> KitTarget:
    """Construct the class at ``path`` directly; its entry point is still probed."""
    try:
        cls = import_platform_class(path)
    except ValueError as exc:
        return KitTarget(path, None, None, None, None, str(exc), class_path=path)
    name = getattr(cls, "name", None) or path
    entries = [e for e in find_plugins(PLATFORM_GROUP, None) if e.name == name]
    entry = entries[0] if entries else None
    result, error = _call_probe(entry) if entry is not None else (None, None)
    platform: Platform | None = None
    problem = None
    try:
        platform = cls(dataclasses.replace(env, VLLM_TARGET_DEVICE=name))
    except Exception as exc:
        problem = f"constructing {cls.__qualname__}(env) raised {exc!r}"
    if entry is None and problem is None:
        installed = sorted({ep.name for ep in entry_points(group=PLATFORM_GROUP)})
        problem = (
            f"{path} is platform {name!r}, but no entry point named {name!r} is in the group "
            f"{PLATFORM_GROUP!r}; installed: {', '.join(installed) or 'none'}"
        )
    return KitTarget(name, entry, result, error, platform, problem, class_path=path)


@functools.cache
def load_target(
    name: str | None,
    class_path: str | None = None,
    env_overrides: tuple[tuple[str, Any], ...] = (),
) -> KitTarget:
    """Find, probe and construct the platform ``name`` (or the class at ``class_path``)
    once per process.

    Never raises: whatever goes wrong is recorded for the contract checks to report.
    The platform gets the process's environment snapshot, as the engine would give it,
    with ``env_overrides`` (EnvSnapshot field, typed value) applied on top.
    """
    label = class_path or name or "?"
    known = {f.name for f in dataclasses.fields(EnvSnapshot)}
    unknown = sorted(k for k, _ in env_overrides if k not in known)
    if unknown:
        return KitTarget(
            label,
            None,
            None,
            None,
            None,
            f"kvrun_env sets {', '.join(unknown)}, which the environment snapshot does not "
            "have (`kvrun env` lists every variable)",
            class_path,
        )
    try:
        # A conformance run is not usage: it records none.
        base: EnvSnapshot = dataclasses.replace(
            read_env(), VLLM_NO_USAGE_STATS=True, **dict(env_overrides)
        )
    except Exception as exc:  # a bad VLLM_* value in the process environment
        return KitTarget(label, None, None, None, None, f"the environment: {exc}", class_path)
    if class_path is not None:
        return _class_target(class_path, base)
    assert name is not None, "a target has a name or a class path"
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
            platform = info.platform_class(dataclasses.replace(base, VLLM_TARGET_DEVICE=name))
        except Exception as exc:
            problem = f"constructing {info.platform_class.__qualname__}(env) raised {exc!r}"
    if isinstance(result, Unavailable) and problem is None:
        problem = result.reason
    return KitTarget(name, entry, result, error, platform, problem)
