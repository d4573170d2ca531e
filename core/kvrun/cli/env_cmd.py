"""`kvrun env`: every variable with its value, default, source, doc and effect in kvrun.

Imports nothing heavy (no torch, no plugin): it must answer instantly, even on a
machine where the rest of kvrun cannot start.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvrun.env_effects import EFFECTS
from kvrun.envs import GROUPS, VARIABLES, EnvSnapshot, EnvVar

__all__ = ["add_arguments", "markdown_table", "rows", "run"]

_HIDDEN = "<hidden>"  # what secrets (API and S3 keys) show instead of their value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list, one object a variable")
    out.add_argument(
        "--markdown",
        action="store_true",
        help="print the registry as the Markdown tables of docs/configuration.md",
    )


def run(args: argparse.Namespace, env: EnvSnapshot) -> int:
    if args.json:
        print(json.dumps(rows(env), indent=2))
    elif args.markdown:
        print(markdown_table(), end="")
    else:
        print(_text(env), end="")
    return 0


def rows(env: EnvSnapshot) -> list[dict[str, Any]]:
    """One JSON-ready object a variable, values typed (booleans, numbers, lists)."""
    out = []
    for var, value, source in env.items():
        raw = env.raw(var.name)
        out.append(
            {
                "name": var.name,
                "value": _HIDDEN if var.secret and value is not None else value,
                "default": env.default(var.name),
                "source": source,
                "raw": _HIDDEN if var.secret and raw is not None else raw,
                "type": var.type,
                "group": var.group,
                "accepted": var.accepted,
                "doc": var.doc,
                "honoured": EFFECTS[var.name].honoured,
                "effect": EFFECTS[var.name].describe(),
            }
        )
    return out


def _show(var: EnvVar, value: Any) -> str:
    if var.secret and value is not None:
        return _HIDDEN
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if value == "":
        return '""'
    return str(value)


def _text(env: EnvSnapshot) -> str:
    items = list(env.items())
    set_count = sum(source == "environment" for _, _, source in items)
    lines = [f"{len(items)} variables, {set_count} set in the environment", ""]
    for group in GROUPS:
        members = [item for item in items if item[0].group == group]
        lines.append(f"[{group}]")
        for var, value, source in members:
            where = "[default]"
            if source == "environment":
                where = f"[environment; default {_show(var, env.default(var.name))}]"
            lines.append(f"  {var.name} = {_show(var, value)}  {where}")
            lines.append(f"      {var.type}: {var.doc}")
            lines.append(f"      effect: {EFFECTS[var.name].describe()}")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The per-group variable tables of docs/configuration.md (a test keeps them in sync)."""
    lines: list[str] = []
    for group in GROUPS:
        lines += [
            f"### {group}",
            "",
            "| Variable | Type | Default | What it does | Effect in kvrun |",
            "|---|---|---|---|---|",
        ]
        for var in VARIABLES:
            if var.group == group:
                cells = (
                    f"`{var.name}`",
                    var.type,
                    _cell(var.default_text),
                    _cell(var.doc),
                    _cell(EFFECTS[var.name].describe()),
                )
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
