"""Plugin discovery, platform selection and the hooks general plugins implement.

Importing this package reads no metadata and imports no plugin and no torch;
the functions below do their work when called, from an entry point, once per process.
"""

from kvrun.plugins.discovery import (
    API_GROUP,
    GENERAL_GROUP,
    PLATFORM_GROUP,
    PlatformInfo,
    PluginEntry,
    discover_platforms,
    find_plugins,
    probe_platform,
)
from kvrun.plugins.general import (
    GeneralPluginInfo,
    GeneralPlugins,
    load_general_plugins,
    run_general_plugins,
)
from kvrun.plugins.hookspecs import KvrunHookSpecs, hookimpl, new_plugin_manager
from kvrun.plugins.selection import (
    FIRST_PARTY_DEVICES,
    Selection,
    choose_platform,
    create_platform,
    install_command,
    select_platform,
)

__all__ = [
    "API_GROUP",
    "FIRST_PARTY_DEVICES",
    "GENERAL_GROUP",
    "PLATFORM_GROUP",
    "GeneralPluginInfo",
    "GeneralPlugins",
    "KvrunHookSpecs",
    "PlatformInfo",
    "PluginEntry",
    "Selection",
    "choose_platform",
    "create_platform",
    "discover_platforms",
    "find_plugins",
    "hookimpl",
    "install_command",
    "load_general_plugins",
    "new_plugin_manager",
    "probe_platform",
    "run_general_plugins",
    "select_platform",
]
