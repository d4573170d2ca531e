"""Load formats (vLLM's ``load_format``) and which files of a directory each one reads.

- ``auto``: safetensors if the directory has any, else PyTorch ``.bin``/``.pt`` files;
  a path to a ``.gguf`` file is read as GGUF.
- ``safetensors``: ``*.safetensors`` only (sharded through model.safetensors.index.json).
- ``pt``: PyTorch ``.bin``/``.pt`` files (sharded through pytorch_model.bin.index.json),
  read with ``torch.load(weights_only=True)``: never an arbitrary pickle.
- ``gguf``: a single ``.gguf`` file.
- ``dummy``: no weight file is read; random weights of the shapes config.json implies.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from kvrun.config import LOAD_FORMATS
from kvrun.errors import ConfigError, ModelLoadError

__all__ = [
    "CONFIG_PATTERNS",
    "LOAD_FORMATS",
    "PT_SUFFIXES",
    "TRAINING_FILES",
    "check_load_format",
    "directory_weight_format",
    "indexed_shards",
    "local_names",
    "wanted_files",
]

# What a checkpoint directory needs besides its weights: config, tokenizer and chat
# template files (what a hub or S3 download fetches).
CONFIG_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
PT_SUFFIXES = (".bin", ".pt")
# Files trainers save beside the weights with the same suffixes; never weights.
TRAINING_FILES = frozenset(
    {
        "training_args.bin",
        "optimizer.bin",
        "optimizer.pt",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
    }
)


def check_load_format(name: str, what: str = "load_format") -> str:
    """``name`` if it is a known load format; a ConfigError listing them otherwise."""
    if name not in LOAD_FORMATS:
        raise ConfigError(f"{what} {name!r} is not known; accepted: {', '.join(LOAD_FORMATS)}")
    return name


def _kind(name: str) -> str | None:
    """The load format that reads a file of this name, or None for a non-weight file."""
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(PT_SUFFIXES) and name not in TRAINING_FILES:
        return "pt"
    if name.endswith(".gguf"):
        return "gguf"
    return None


def directory_weight_format(
    names: Iterable[str], load_format: str, where: str
) -> Literal["safetensors", "pt"] | None:
    """The format whose files a directory of ``names`` is read with under ``load_format``
    (None for ``dummy``); a ModelLoadError naming what was found and what is accepted
    when the directory holds no weights of that format. ``where`` names the directory."""
    kinds: dict[str, list[str]] = {}
    for name in sorted(names):
        kind = _kind(name)
        if kind is not None:
            kinds.setdefault(kind, []).append(name)
    if load_format == "dummy":
        return None
    if "safetensors" in kinds and load_format in ("auto", "safetensors"):
        return "safetensors"
    if "pt" in kinds and load_format in ("auto", "pt"):
        return "pt"
    found = "; ".join(f"{', '.join(files[:4])} ({kind})" for kind, files in kinds.items())
    reads = {
        "auto": "*.safetensors, else PyTorch *.bin / *.pt files",
        "safetensors": "*.safetensors files",
        "pt": "PyTorch *.bin / *.pt files",
        "gguf": "a single .gguf file given by its own path, not a directory",
    }[load_format]
    hint = ""
    if "gguf" in kinds:
        hint = "; pass a .gguf file's own path to read it"
    elif kinds and load_format != "auto":
        hint = "; load_format='auto' picks whichever the directory holds"
    raise ModelLoadError(
        f"{where}: load_format={load_format!r} reads {reads}, but it holds "
        f"{found or 'no weight files'}{hint} (load formats: {', '.join(LOAD_FORMATS)})"
    )


def wanted_files(names: Iterable[str], load_format: str, *, weights: bool, where: str) -> list[str]:
    """Which of a remote directory's ``names`` a load fetches: config and tokenizer files,
    and (``weights``) the weight files ``load_format`` reads there."""
    names = sorted(names)
    config = [n for n in names if any(fnmatch.fnmatch(n, p) for p in CONFIG_PATTERNS)]
    if not weights or load_format == "dummy":
        return config
    kind = directory_weight_format(names, load_format, where)
    return config + [n for n in names if _kind(n) == kind]


def local_names(directory: Path) -> list[str]:
    """The names of the plain files in ``directory``."""
    return [p.name for p in directory.iterdir() if p.is_file()]


def indexed_shards(index: Path, source: str, what: str) -> tuple[Path, ...]:
    """The shard files a ``*.index.json`` (``what``: "safetensors", "PyTorch weights")
    names in its weight_map, each checked to exist beside it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"model {source!r}: {index} is not a {what} index "
            f"(an object with a 'weight_map' of tensor name -> file): {exc}"
        ) from exc
    files = tuple(index.parent / name for name in names)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(
            f"model {source!r}: {index} lists shards that are missing: {', '.join(missing)}"
        )
    return files
