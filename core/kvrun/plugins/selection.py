"""Choosing this process's platform: VLLM_TARGET_DEVICE if set, else the highest priority.

Auto selection ranks the usable platforms by their class's ``priority``: the cpu
plugin declares 0 and every accelerator plugin more, so an accelerator wins when its
hardware is there and cpu is the fallback, without the core naming either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrun.errors import PluginError
from kvrun.plugins.discovery import PlatformInfo, discover_platforms

if TYPE_CHECKING:
    import pluggy

    from kvrun.envs import EnvSnapshot
    from kvrun.platforms import Platform

__all__ = [
    "FIRST_PARTY_DEVICES",
    "Selection",
    "choose_platform",
    "create_platform",
    "install_command",
    "select_platform",
]

logger = logging.getLogger(__name__)

# The platforms kvrun ships a plugin for (extras of the "kvrun" distribution). Used only
# to word errors (known names, install commands); selection never branches on them.
FIRST_PARTY_DEVICES: tuple[str, ...] = ("cpu", "cuda", "hpu", "openvino", "rocm", "tpu")


def install_command(device: str) -> str:
    """The command that installs a first-party platform plugin."""
    return f'pip install "kvrun[{device}]"'


@dataclass(frozen=True)
class Selection:
    """The platform chosen for this process, why, and everything that was considered."""

    platform: PlatformInfo  # the chosen plugin; always usable
    reason: str  # one line for logs and `kvrun plugins`: why this one
    infos: tuple[PlatformInfo, ...]  # every installed platform plugin, sorted by name

    @property
    def platform_class(self) -> type[Platform]:
        assert self.platform.platform_class is not None, "a selected platform is usable"
        return self.platform.platform_class


def _installed(infos: Sequence[PlatformInfo]) -> str:
    if not infos:
        return "Installed platform plugins: none."
    lines = ["Installed platform plugins:"]
    for info in infos:
        state = "usable" if info.usable else f"not usable: {info.reason}"
        lines.append(f"  {info.describe()}: {state}")
    return "\n".join(lines)


def _auto(infos: tuple[PlatformInfo, ...]) -> Selection:
    usable = sorted((i for i in infos if i.usable), key=lambda i: (-(i.priority or 0), i.name))
    if not usable:
        raise PluginError(
            "no usable platform: VLLM_TARGET_DEVICE is unset (auto) and no installed platform "
            f"plugin is usable.\n{_installed(infos)}\n"
            f"Install one with {install_command('DEVICE')}, DEVICE one of: "
            f"{', '.join(FIRST_PARTY_DEVICES)}"
        )
    best = usable[0]
    if len(usable) == 1:
        reason = (
            f"VLLM_TARGET_DEVICE is unset: {best.name} is the only usable platform "
            f"(priority {best.priority})"
        )
    else:
        ranking = ", ".join(f"{i.name} ({i.priority})" for i in usable)
        reason = (
            f"VLLM_TARGET_DEVICE is unset: {best.name} has the highest priority of the "
            f"usable platforms: {ranking}"
        )
        if usable[1].priority == best.priority:
            reason += (
                f"; tied with {usable[1].name} and chosen by name "
                "(set VLLM_TARGET_DEVICE to choose)"
            )
    return Selection(platform=best, reason=reason, infos=infos)


def choose_platform(infos: Sequence[PlatformInfo], target_device: str | None) -> Selection:
    """Pick from discovered platforms; ``target_device`` is VLLM_TARGET_DEVICE (None = auto).

    Raises :class:`PluginError` when the named platform is unknown, not installed or
    not usable, or (auto) when no platform is usable; the message lists every installed
    platform plugin with why it is not usable.
    """
    infos = tuple(infos)
    if target_device is None:
        return _auto(infos)
    matches = [i for i in infos if i.name == target_device]
    if matches and matches[0].usable:
        return Selection(
            platform=matches[0], reason=f"VLLM_TARGET_DEVICE={target_device}", infos=infos
        )
    if matches:
        hint = (
            f"\nInstall or repair it with: {install_command(target_device)}"
            if target_device in FIRST_PARTY_DEVICES
            else ""
        )
        raise PluginError(
            f"VLLM_TARGET_DEVICE={target_device}, but its platform plugin "
            f"{matches[0].describe()} is not usable: {matches[0].reason}\n"
            f"{_installed(infos)}{hint}"
        )
    if target_device in FIRST_PARTY_DEVICES:
        raise PluginError(
            f"VLLM_TARGET_DEVICE={target_device}, but no installed plugin provides the "
            f"{target_device!r} platform.\n{_installed(infos)}\n"
            f"Install it with: {install_command(target_device)}"
        )
    raise PluginError(
        f"VLLM_TARGET_DEVICE={target_device!r} names no known device and no installed "
        f"platform plugin; known devices: {', '.join(FIRST_PARTY_DEVICES)}.\n{_installed(infos)}"
    )


def select_platform(env: EnvSnapshot) -> Selection:
    """Discover the platform plugins VLLM_PLUGINS allows and choose by VLLM_TARGET_DEVICE."""
    infos = discover_platforms(env.VLLM_PLUGINS)
    return choose_platform(infos, env.VLLM_TARGET_DEVICE)


def create_platform(env: EnvSnapshot, hooks: pluggy.PluginManager | None = None) -> Platform:
    """Select the platform, construct it with ``env`` and tell general plugins (``hooks``)."""
    selection = select_platform(env)
    platform = selection.platform_class(env)
    logger.info("platform %s: %s", selection.platform.name, selection.reason)
    if hooks is not None:
        hooks.hook.kvrun_platform_selected(platform_name=selection.platform.name)
    return platform
