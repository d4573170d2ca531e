"""Finding plugins by entry point, refusing incompatible ones, and probing platforms.

Everything here reads distribution metadata and runs plugin code only where it says
so: :func:`find_plugins` reads metadata alone (no plugin module is imported), so a
plugin filtered out by VLLM_PLUGINS, declaring an unsupported plugin-API version or
clashing with another distribution is refused before any of its code runs.
:func:`discover_platforms` then probes the rest. A plugin that raises while being
imported or probed never breaks discovery: it is reported unusable with the
exception text.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from kvrun import plugin_api
from kvrun.version import __version__

if TYPE_CHECKING:
    from kvrun.platforms import Platform

__all__ = [
    "API_GROUP",
    "GENERAL_GROUP",
    "PLATFORM_GROUP",
    "PlatformInfo",
    "PluginEntry",
    "discover_platforms",
    "dist_label",
    "find_plugins",
    "probe_platform",
]

PLATFORM_GROUP = "kvrun.platform_plugins"
GENERAL_GROUP = "kvrun.general_plugins"
API_GROUP = "kvrun.plugin_api"

_API_VALUE = re.compile(r"^\s*kvrun\.plugin_api\s*:\s*v(\d+)\s*$")


@dataclass(frozen=True)
class PluginEntry:
    """One entry point in a plugin group, as read from metadata (nothing imported)."""

    group: str  # PLATFORM_GROUP or GENERAL_GROUP
    name: str  # entry-point name: what VLLM_PLUGINS and VLLM_TARGET_DEVICE name
    value: str  # "module:attr" the entry point loads
    distribution: str | None  # the distribution that declares it; None if metadata lacks it
    version: str | None  # that distribution's version
    api_version: int | None  # the plugin-API version it declares; None if missing or malformed
    refused: str | None  # why the core will not run it (filter, API, clash); None = runnable
    entry_point: EntryPoint = field(repr=False, compare=False)

    def describe(self) -> str:
        """``'cpu' (dist kvrun-cpu 0.1.0)``: how messages name a plugin."""
        return f"{self.name!r} ({dist_label(self.distribution, self.version)})"


@dataclass(frozen=True)
class PlatformInfo:
    """What discovery learned about one installed platform plugin."""

    name: str  # entry-point name; the VLLM_TARGET_DEVICE value that selects it
    distribution: str | None  # e.g. "kvrun-cpu"
    version: str | None  # e.g. "0.1.0"
    api_version: int | None  # declared plugin-API version
    entry_point: str  # "module:attr" of the probe
    usable: bool  # the probe returned a valid Platform subclass
    reason: str  # unusable: why; usable: what the probe returned
    priority: int | None  # the class's priority; None when unusable (no class to ask)
    platform_class: type[Platform] | None = field(default=None, compare=False)  # set iff usable

    def describe(self) -> str:
        """``cpu (kvrun-cpu 0.1.0)``: how selection messages name a platform."""
        return f"{self.name} ({dist_label(self.distribution, self.version, prefix='')})"


def dist_label(distribution: str | None, version: str | None, prefix: str = "dist ") -> str:
    """``dist kvrun-cpu 0.1.0``: a distribution as messages name it."""
    if distribution is None:
        return "unknown distribution"
    return f"{prefix}{distribution} {version}" if version else f"{prefix}{distribution}"


def _normalize(dist_name: str) -> str:
    # PEP 503 normalization, so "kvrun_cpu" metadata matches "kvrun-cpu".
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _supported() -> str:
    return ", ".join(f"v{v}" for v in sorted(plugin_api.SUPPORTED))


def _api_check(label: str, name: str, declared: str | None) -> tuple[int | None, str | None]:
    """The declared version and, when the core must refuse the plugin, why."""
    tail = f"this kvrun {__version__} supports {_supported()}"
    if declared is None:
        return None, (
            f"plugin {label} declares no kvrun plugin API version (add "
            f'{name} = "kvrun.plugin_api:v{plugin_api.CURRENT}" under '
            f'[project.entry-points."{API_GROUP}"]); {tail}'
        )
    match = _API_VALUE.match(declared)
    if match is None:
        return None, (
            f"plugin {label} declares kvrun plugin API {declared!r}, which is not of the "
            f"form 'kvrun.plugin_api:vN'; {tail}"
        )
    version = int(match.group(1))
    if version not in plugin_api.SUPPORTED:
        return version, f"plugin {label} implements kvrun plugin API v{version}; {tail}"
    return version, None


def _filter_check(name: str, plugins_filter: Sequence[str] | None) -> str | None:
    if plugins_filter is None or name in plugins_filter:
        return None
    if not plugins_filter:
        return "not loaded: VLLM_PLUGINS is set but empty, so no plugin is loaded"
    return f"not loaded: VLLM_PLUGINS={','.join(plugins_filter)} does not name it"


def find_plugins(group: str, plugins_filter: Sequence[str] | None) -> list[PluginEntry]:
    """Every entry point in ``group``, with the reason it is refused, sorted by name.

    ``plugins_filter`` is VLLM_PLUGINS: None runs all, an empty list none, otherwise
    only the entry points named. Reads metadata only: no plugin module is imported.
    """
    declared: dict[tuple[str | None, str], str] = {}
    for ep in entry_points(group=API_GROUP):
        dist, _ = _dist_of(ep)
        declared[(_normalize(dist) if dist else None, ep.name)] = ep.value

    found = [(ep, *_dist_of(ep)) for ep in entry_points(group=group)]
    by_name: dict[str, list[str]] = {}
    for ep, dist, version in found:
        by_name.setdefault(ep.name, []).append(dist_label(dist, version))

    entries = []
    for ep, dist, version in found:
        label = f"{ep.name!r} ({dist_label(dist, version)})"
        key = (_normalize(dist) if dist else None, ep.name)
        api_version, api_refusal = _api_check(label, ep.name, declared.get(key))
        others = [d for d in by_name[ep.name] if d != dist_label(dist, version)]
        clash = (
            f"the entry-point name {ep.name!r} in {group} is also registered by "
            f"{', '.join(others)}; uninstall one of them"
            if others
            else None
        )
        entries.append(
            PluginEntry(
                group=group,
                name=ep.name,
                value=ep.value,
                distribution=dist,
                version=version,
                api_version=api_version,
                refused=_filter_check(ep.name, plugins_filter) or api_refusal or clash,
                entry_point=ep,
            )
        )
    return sorted(entries, key=lambda e: (e.name, e.distribution or ""))


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _resolve(result: Any, entry: PluginEntry) -> tuple[type[Platform] | None, str]:
    """The Platform class a probe's result names, or None and why not."""
    from kvrun.platforms import Platform

    if isinstance(result, str):
        module_name, _, attr = result.rpartition(".")
        if not module_name:
            return None, f"probe returned {result!r}, which is not a dotted path 'pkg.mod.Class'"
        try:
            result = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            return None, f"probe returned {result!r}, which cannot be imported: {_exc_text(exc)}"
    if not (isinstance(result, type) and issubclass(result, Platform)):
        return None, (
            f"probe returned {result!r}; expected a kvrun.platforms.Platform subclass, its "
            f"dotted path, None or kvrun.platforms.Unavailable"
        )
    where = f"{result.__module__}.{result.__qualname__}"
    if inspect.isabstract(result):
        missing = ", ".join(sorted(getattr(result, "__abstractmethods__", ())))
        return None, f"{where} is abstract (does not implement: {missing})"
    class_name = getattr(result, "name", None)
    if class_name != entry.name:
        return None, (
            f"{where}.name is {class_name!r} but its entry point is named {entry.name!r}; "
            f"they must be equal (VLLM_TARGET_DEVICE selects by that name)"
        )
    if not isinstance(result.priority, int):
        return None, f"{where}.priority is {result.priority!r}; it must be an int"
    return result, f"probe {entry.value} returned {where}"


def probe_platform(entry: PluginEntry) -> PlatformInfo:
    """Import and run one platform probe; never raises for a broken plugin."""
    platform_class: type[Platform] | None = None
    if entry.refused is not None:
        reason = entry.refused
    else:
        try:
            probe = entry.entry_point.load()
        except Exception as exc:
            reason = f"importing {entry.value} raised {_exc_text(exc)}"
        else:
            try:
                result = probe()
            except Exception as exc:
                reason = f"probe {entry.value} raised {_exc_text(exc)}"
            else:
                if result is None:
                    reason = f"probe {entry.value} returned None (no reason given)"
                elif not result and isinstance(getattr(result, "reason", None), str):
                    reason = result.reason  # kvrun.platforms.Unavailable
                else:
                    platform_class, reason = _resolve(result, entry)
    return PlatformInfo(
        name=entry.name,
        distribution=entry.distribution,
        version=entry.version,
        api_version=entry.api_version,
        entry_point=entry.value,
        usable=platform_class is not None,
        reason=reason,
        priority=platform_class.priority if platform_class is not None else None,
        platform_class=platform_class,
    )


def discover_platforms(plugins_filter: Sequence[str] | None) -> list[PlatformInfo]:
    """Every installed platform plugin, probed unless refused, sorted by name.

    ``plugins_filter`` is VLLM_PLUGINS (None = all, [] = none, else those names).
    Probing imports each runnable plugin; call this once per process and keep the result.
    """
    return [probe_platform(entry) for entry in find_plugins(PLATFORM_GROUP, plugins_filter)]
