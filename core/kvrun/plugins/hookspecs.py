"""The hooks the core calls on general plugins (pluggy project name ``kvrun``).

A general plugin's entry point may return an object (or module) whose methods are
marked with :data:`hookimpl`; the core registers it into a plugin manager built by
:func:`new_plugin_manager` and calls the hooks below. Plugins add behaviour only
through these hooks: where a vendor would need to patch a core object, the core is
missing a hook and one is added here (with a plugin-API version bump if the change
is incompatible).
"""

from __future__ import annotations

from collections.abc import Mapping

import pluggy

__all__ = ["PROJECT_NAME", "KvrunHookSpecs", "hookimpl", "hookspec", "new_plugin_manager"]

PROJECT_NAME = "kvrun"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
# What plugins decorate their hook implementations with: ``@kvrun.plugins.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class KvrunHookSpecs:
    """Hook specifications. Implementations take only the arguments they need."""

    @hookspec
    def kvrun_model_architectures(self) -> Mapping[str, str]:  # type: ignore[empty-body]
        """Model classes this plugin adds, for the model registry to merge.

        Returns a mapping from a Hugging Face architecture name (the ``architectures``
        entry of config.json, e.g. ``"LlamaForCausalLM"``) to ``"module:ClassName"`` of a
        kvrun model class. The class is imported only when a model of that
        architecture is loaded, so returning the mapping must not import model code.
        """

    @hookspec
    def kvrun_platform_selected(self, platform_name: str) -> None:
        """A notification: the platform ``platform_name`` was selected for this process."""


def new_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager with the kvrun hookspecs; the caller owns it (no global manager)."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(KvrunHookSpecs)
    return manager
