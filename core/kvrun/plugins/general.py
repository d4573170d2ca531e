"""Running general plugins (models, ops, loaders) and registering their hooks.

A general plugin's entry point is a zero-argument callable. Each call of
:func:`run_general_plugins` runs every runnable one once and registers whatever it
returns into a new plugin manager; there is no process-wide manager, so the caller
(an entry point: the CLI, ``LLM``, the server) calls it once and keeps the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pluggy

from kvrun.errors import PluginError
from kvrun.plugins.discovery import GENERAL_GROUP, PluginEntry, dist_label, find_plugins
from kvrun.plugins.hookspecs import new_plugin_manager

__all__ = ["GeneralPluginInfo", "GeneralPlugins", "load_general_plugins", "run_general_plugins"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneralPluginInfo:
    """What running one general plugin did."""

    name: str  # entry-point name, as VLLM_PLUGINS names it
    distribution: str | None  # e.g. "kvrun-fixture-general"
    version: str | None  # that distribution's version
    api_version: int | None  # declared plugin-API version
    entry_point: str  # "module:attr" of the callable
    usable: bool  # it ran and whatever it returned was registered
    reason: str  # not usable: why; usable: what was registered
    hooks: tuple[str, ...]  # names of the kvrun hooks it implements, sorted


@dataclass(frozen=True)
class GeneralPlugins:
    """The plugin manager with every general plugin that ran, and a report per plugin."""

    manager: pluggy.PluginManager  # call hooks as manager.hook.kvrun_...(...)
    infos: tuple[GeneralPluginInfo, ...]  # one per installed general plugin, sorted by name


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _run_one(entry: PluginEntry, manager: pluggy.PluginManager) -> tuple[bool, str, list[str]]:
    """Run one entry point and register its result: (usable, reason, hook names)."""
    if entry.refused is not None:
        return False, entry.refused, []
    try:
        setup = entry.entry_point.load()
    except Exception as exc:
        return False, f"importing {entry.value} raised {_exc_text(exc)}", []
    if not callable(setup):
        return False, f"{entry.value} is {setup!r}, not a zero-argument callable", []
    try:
        plugin = setup()
    except Exception as exc:
        return False, f"calling {entry.value}() raised {_exc_text(exc)}", []
    if plugin is None:
        return True, f"{entry.value}() ran and returned no hooks", []
    try:
        manager.register(plugin, name=entry.name)
        # Hook implementations with no matching hookspec (a misspelt name) fail here
        # rather than being silently never called.
        manager.check_pending()
    except Exception as exc:
        if manager.is_registered(plugin):
            manager.unregister(plugin)
        return False, f"registering what {entry.value}() returned raised {_exc_text(exc)}", []
    callers = manager.get_hookcallers(plugin) or []
    hooks = sorted(caller.name for caller in callers)
    return True, f"{entry.value}() registered hooks: {', '.join(hooks) or 'none'}", hooks


def run_general_plugins(plugins_filter: Sequence[str] | None) -> GeneralPlugins:
    """Run every runnable general plugin once; never raises for a broken plugin.

    ``plugins_filter`` is VLLM_PLUGINS (None = all, [] = none, else those names).
    """
    manager = new_plugin_manager()
    infos = []
    for entry in find_plugins(GENERAL_GROUP, plugins_filter):
        usable, reason, hooks = _run_one(entry, manager)
        infos.append(
            GeneralPluginInfo(
                name=entry.name,
                distribution=entry.distribution,
                version=entry.version,
                api_version=entry.api_version,
                entry_point=entry.value,
                usable=usable,
                reason=reason,
                hooks=tuple(hooks),
            )
        )
    return GeneralPlugins(manager=manager, infos=tuple(infos))


def load_general_plugins(plugins_filter: Sequence[str] | None) -> pluggy.PluginManager:
    """Run the general plugins and return the manager to call hooks on.

    A plugin that fails is logged and skipped, unless VLLM_PLUGINS names it: then the
    user asked for it explicitly and a :class:`PluginError` says why it failed.
    """
    loaded = run_general_plugins(plugins_filter)
    for info in loaded.infos:
        named = plugins_filter is not None and info.name in plugins_filter
        if info.usable or (plugins_filter is not None and not named):
            continue
        label = f"general plugin {info.name!r} ({dist_label(info.distribution, info.version)})"
        if named:
            raise PluginError(f"{label}, named in VLLM_PLUGINS, failed: {info.reason}")
        logger.warning("%s skipped: %s", label, info.reason)
    return loaded.manager
