"""ipc:// socket files for the frontend <-> engine link, private to this user.

Each server gets its own directory (mode 0700, a unique name) under
VLLM_RPC_BASE_PATH holding two sockets (mode 0600): the engine binds its input,
the frontend binds its output, and each connects to the other's. Another local
user can reach neither; whatever our own user writes there is decoded as a typed
message or dropped.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import zmq

from kvrun.errors import ConfigError

__all__ = ["IpcPaths", "bind_private", "make_ipc_paths", "remove_ipc_paths"]

# sun_path is 108 bytes on Linux (104 on macOS), terminator included.
_MAX_SOCKET_PATH = 103


@dataclass(frozen=True)
class IpcPaths:
    directory: str  # private directory (0700) holding both socket files
    engine_input: str  # socket file the engine binds: frontend -> engine messages
    frontend_input: str  # socket file the frontend binds: engine -> frontend messages

    @staticmethod
    def address(path: str) -> str:
        return f"ipc://{path}"


def make_ipc_paths(base_path: str) -> IpcPaths:
    """A fresh private directory under ``base_path`` and the two socket paths in it."""
    if not os.path.isdir(base_path):
        raise ConfigError(
            f"VLLM_RPC_BASE_PATH={base_path!r} is not an existing directory; point it at a "
            "writable directory for the server's ipc:// sockets"
        )
    try:
        directory = tempfile.mkdtemp(prefix="kvrun-rpc-", dir=base_path)  # created 0700
    except OSError as exc:
        raise ConfigError(
            f"VLLM_RPC_BASE_PATH={base_path!r}: cannot create the socket directory there ({exc})"
        ) from exc
    paths = IpcPaths(
        directory=directory,
        engine_input=os.path.join(directory, "engine-in.sock"),
        frontend_input=os.path.join(directory, "frontend-in.sock"),
    )
    longest = max(len(paths.engine_input), len(paths.frontend_input))
    if longest > _MAX_SOCKET_PATH:
        remove_ipc_paths(paths)
        raise ConfigError(
            f"VLLM_RPC_BASE_PATH={base_path!r} is too long: socket paths under it are "
            f"{longest} bytes, over the {_MAX_SOCKET_PATH}-byte limit of ipc:// sockets; "
            "use a shorter directory"
        )
    return paths


def bind_private(sock: zmq.Socket[Any], path: str) -> None:
    """Bind ``sock`` at ``path`` and make the socket file readable by this user only."""
    sock.bind(IpcPaths.address(path))
    os.chmod(path, 0o600)


def remove_ipc_paths(paths: IpcPaths) -> None:
    """Remove both socket files and the directory; missing ones are fine."""
    for path in (paths.engine_input, paths.frontend_input):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(paths.directory)
