"""LoRA adapters on the server: ``--lora-modules``, the runtime load/unload routes and the
path policy that guards them.

Adapters are served as models of their own (``model=<adapter name>``, listed in
/v1/models with the base model as parent). The engine loads them by name (a typed
``Utility`` call); this module decides which names and paths may reach it:

- ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` exist only under
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (404 otherwise), behind the API key as every route.
- A runtime path must resolve (``os.path.realpath``: ``..`` and symlinks followed)
  inside one of ``--allowed-lora-paths``, and so must the adapter's two files; with no
  such directory runtime loading is refused. A refusal is a 400 that names the rule,
  never the filesystem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from kvrun.errors import ConfigError
from kvrun.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from kvrun.server.errors import ApiError
from kvrun.server.protocol import parse_body
from kvrun.server.wire import WireLora

__all__ = [
    "LoadLoraAdapterRequest",
    "UnloadLoraAdapterRequest",
    "add_lora_routes",
    "check_allowed_dirs",
    "load_static_adapters",
    "parse_lora_modules",
    "resolve_lora_path",
]

# A name clients put in "model": printable, no path separators, bounded.
_MAX_NAME = 256


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace a loaded adapter of this name


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; the name decides


def parse_lora_modules(values: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """``--lora-modules`` entries, each ``name=path`` or vLLM's JSON ``{"name": ...,
    "path": ...}`` (``base_model_name`` accepted), as (name, path) pairs."""
    modules: list[tuple[str, str]] = []
    for value in values or ():
        if value.lstrip().startswith("{"):
            try:
                entry = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--lora-modules entry {value!r} is not JSON ({exc})") from None
            keys = set(entry) if isinstance(entry, dict) else set()
            unknown = keys - {"name", "path", "base_model_name"}
            if not isinstance(entry, dict) or unknown or not {"name", "path"} <= keys:
                raise ConfigError(
                    f"--lora-modules entry {value!r} is not accepted; accepted: name=path or "
                    '{"name": NAME, "path": PATH} (optionally "base_model_name")'
                )
            name, path = str(entry["name"]), str(entry["path"])
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise ConfigError(
                    f"--lora-modules entry {value!r} is not accepted; accepted: name=path or "
                    '{"name": NAME, "path": PATH}'
                )
        _check_name(name, ConfigError)
        if not path:
            raise ConfigError(f"--lora-modules entry {value!r} has an empty path")
        if name in {n for n, _ in modules}:
            raise ConfigError(f"--lora-modules names the adapter {name!r} twice")
        modules.append((name, path))
    return tuple(modules)


def check_allowed_dirs(values: Sequence[str] | None) -> tuple[str, ...]:
    """``--allowed-lora-paths``: existing directories, as real paths."""
    dirs = []
    for value in values or ():
        real = os.path.realpath(value)
        if not os.path.isdir(real):
            raise ConfigError(f"--allowed-lora-paths {value!r} is not a directory")
        dirs.append(real)
    return tuple(dirs)


def _check_name(name: str, error: Callable[[str], Exception]) -> None:
    if not name or len(name) > _MAX_NAME or not name.isprintable() or "/" in name:
        raise error(
            f"LoRA adapter name {name[:64]!r} is not accepted; accepted: 1 to {_MAX_NAME} "
            "printable characters without '/'"
        )


def _refused(why: str) -> ApiError:
    return ApiError(f"lora_path is refused: {why}", 400, param="lora_path")


def resolve_lora_path(path: str, allowed: Sequence[str]) -> str:
    """The real path of an adapter directory that lies inside ``allowed`` (real paths),
    with its files; an ApiError 400 that does not echo the filesystem otherwise."""
    if not allowed:
        raise _refused(
            "this server allows no runtime LoRA paths (start it with --allowed-lora-paths DIR)"
        )
    if "://" in path or path.startswith("file:"):
        raise _refused("URLs are not accepted; give a directory under --allowed-lora-paths")
    if "\x00" in path or ".." in path.replace("\\", "/").split("/"):
        raise _refused("'..' is not accepted; give a directory under --allowed-lora-paths")
    real = os.path.realpath(path)
    if not _inside(real, allowed):
        raise _refused("it is not inside the directories the server allows (--allowed-lora-paths)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        file = os.path.join(real, name)
        if os.path.lexists(file) and not _inside(os.path.realpath(file), allowed):
            raise _refused(f"its {name} links outside the directories the server allows")
    return real


def _inside(real: str, allowed: Sequence[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in allowed)


async def load_static_adapters(client: Any, modules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Load ``--lora-modules`` into the engine at start; ConfigError naming the adapter
    that cannot load (the server does not start without it)."""
    loaded: dict[str, str] = {}
    for name, path in modules:
        try:
            await client.call("load_lora_adapter", WireLora(name, os.path.realpath(path)))
        except ApiError as exc:
            raise ConfigError(f"--lora-modules {name}={path}: {exc.message}") from None
        loaded[name] = path
    return loaded


def add_lora_routes(app: FastAPI) -> None:
    """The runtime routes (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."""
    from kvrun.server.state import ServerState

    def state_of(request: Request) -> ServerState:
        state: ServerState = request.app.state.kvrun
        return state

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        state = state_of(request)
        req = parse_body(await request.body(), LoadLoraAdapterRequest)
        _check_name(req.lora_name, lambda m: ApiError(m, 400, param="lora_name"))
        if req.lora_name == state.info.model_name:
            raise ApiError(
                f"lora_name `{req.lora_name}` is the base model's name", 400, param="lora_name"
            )
        real = resolve_lora_path(req.lora_path, state.config.allowed_lora_paths)
        state.check_alive()
        if req.load_inplace and req.lora_name in state.loras:
            await state.client.call("unload_lora_adapter", WireLora(req.lora_name))
            state.loras.pop(req.lora_name, None)
        await state.client.call("load_lora_adapter", WireLora(req.lora_name, real))
        state.loras[req.lora_name] = req.lora_path
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        state = state_of(request)
        req = parse_body(await request.body(), UnloadLoraAdapterRequest)
        state.check_alive()
        await state.client.call("unload_lora_adapter", WireLora(req.lora_name))
        state.loras.pop(req.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
