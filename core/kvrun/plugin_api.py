"""The plugin-API versions this core implements.

A plugin declares which version it was written against with an entry point in the
group ``kvrun.plugin_api`` whose name is the plugin's own entry-point name and whose
value points at one of the constants below, e.g.::

    [project.entry-points."kvrun.plugin_api"]
    cpu = "kvrun.plugin_api:v1"

The core reads that declaration from the distribution's metadata without importing
the plugin, so an incompatible plugin is refused before any of its code runs.
"""

__all__ = ["CURRENT", "SUPPORTED", "v1"]

v1 = 1
CURRENT = v1
# Versions whose plugins this core can drive.
SUPPORTED = frozenset({v1})
