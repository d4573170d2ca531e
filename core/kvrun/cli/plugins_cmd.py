"""`kvrun plugins`: every discovered plugin, whether it is usable and why, and the selection.

Exit status 0 when a platform can be selected, 1 when not (the listing is still
printed, with the selection error). Importing this module is cheap: discovery and
everything it imports load only when the verb runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrun.envs import EnvSnapshot
    from kvrun.plugins import GeneralPluginInfo, PlatformInfo

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: platforms, general, selected (null with error on failure)",
    )


def _platform_row(info: PlatformInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "distribution": info.distribution,
        "version": info.version,
        "api_version": info.api_version,
        "entry_point": info.entry_point,
        "usable": info.usable,
        "reason": info.reason,
        "priority": info.priority,
    }


def _general_row(info: GeneralPluginInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "distribution": info.distribution,
        "version": info.version,
        "api_version": info.api_version,
        "entry_point": info.entry_point,
        "usable": info.usable,
        "reason": info.reason,
        "hooks": list(info.hooks),
    }


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """Aligned columns; the last column (the reason) is left unpadded."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return ",".join(value) or "-"
        return str(value)

    cells = [[c.upper() for c in columns]] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns) - 1)]
    return [
        "  " + "  ".join([*(v.ljust(w) for v, w in zip(line, widths, strict=False)), line[-1]])
        for line in cells
    ]


def _text_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the table shows them: the API version as "v1"."""
    api = "api_version"
    return [{**r, "api": None if r[api] is None else f"v{r[api]}"} for r in rows]


def _setting(value: Any, unset: str) -> str:
    if value is None:
        return f"unset ({unset})"
    return ",".join(value) if isinstance(value, list) else str(value)


def run(args: argparse.Namespace, env: EnvSnapshot) -> int:
    from kvrun.errors import PluginError
    from kvrun.host_cpu import host_cpu
    from kvrun.plugins import choose_platform, discover_platforms, run_general_plugins

    platforms = discover_platforms(env.VLLM_PLUGINS)
    general = run_general_plugins(env.VLLM_PLUGINS)
    selected: str | None = None
    why: str
    try:
        selection = choose_platform(platforms, env.VLLM_TARGET_DEVICE)
    except PluginError as exc:
        why = str(exc)
    else:
        selected, why = selection.platform.name, selection.reason

    platform_rows = [_platform_row(i) for i in platforms]
    general_rows = [_general_row(i) for i in general.infos]
    cpu = host_cpu()
    if args.json:
        out: dict[str, Any] = {"platforms": platform_rows, "general": general_rows}
        out["host_cpu"] = {"model": cpu.model, "features": list(cpu.features)}
        out["selected"] = selected
        out["reason" if selected is not None else "error"] = why
        print(json.dumps(out, indent=2))
        return 0 if selected is not None else 1

    lines = [
        f"VLLM_TARGET_DEVICE={_setting(env.VLLM_TARGET_DEVICE, 'auto')}  "
        f"VLLM_PLUGINS={_setting(env.VLLM_PLUGINS, 'all')}",
        f"Host CPU: {cpu.describe()}",
        "",
        "Platform plugins (kvrun.platform_plugins):",
    ]
    columns = ("name", "distribution", "version", "api", "priority", "usable", "reason")
    lines += _table(_text_rows(platform_rows), columns) if platform_rows else ["  none"]
    lines += ["", "General plugins (kvrun.general_plugins):"]
    columns = ("name", "distribution", "version", "api", "usable", "hooks", "reason")
    lines += _table(_text_rows(general_rows), columns) if general_rows else ["  none"]
    lines += ["", f"Selected platform: {selected or 'none'}"]
    lines += [f"  {line}" for line in why.splitlines()]
    print("\n".join(lines))
    return 0 if selected is not None else 1
