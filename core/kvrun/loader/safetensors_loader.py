"""Weights from a Hugging Face directory of ``*.safetensors`` files.

The files are checked when the checkpoint is opened (header parses, every tensor's
bytes lie inside the file), so a truncated download fails with the file's name
before any weight is read, not as a low-level error half-way through loading.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvrun.errors import ModelLoadError
from kvrun.loader.formats import indexed_shards

__all__ = [
    "ReadPlan",
    "find_safetensors_files",
    "iter_safetensors",
    "read_parts",
    "validate_safetensors",
]

# Which parts of a tensor to read: (dim, spans): the [start, end) spans along ``dim``,
# joined in order (a tensor-parallel rank's share; kvrun.distributed.parallel.weight_plan).
ReadPlan = tuple[int, tuple[tuple[int, int], ...]]
# For a tensor's name and whole shape, the parts to read, or None for all of it.
Narrow = Callable[[str, tuple[int, ...]], ReadPlan | None]

_INDEX = "model.safetensors.index.json"
# Buffers some older checkpoints saved; they are recomputed from the config, never loaded.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def find_safetensors_files(directory: Path, source: str) -> tuple[Path, ...]:
    """The weight files of ``directory``: the index's shards, else model.safetensors, else all."""
    index = directory / _INDEX
    if index.is_file():
        return indexed_shards(index, source, "safetensors")
    single = directory / "model.safetensors"
    if single.is_file():
        return (single,)
    files = tuple(sorted(directory.glob("*.safetensors")))
    if files:
        return files
    # kvrun.loader.formats picked this format from the files, so this is a lost race.
    raise ModelLoadError(f"model {source!r}: no *.safetensors weights in {directory}")


def validate_safetensors(path: Path) -> int:
    """Check ``path``'s header and that the file holds every tensor.

    Returns how many tensors :func:`iter_safetensors` will yield from it.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file: it is {size} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise ModelLoadError(
                    f"{path} is truncated or not a safetensors file: its header claims "
                    f"{header_len} bytes but the file is {size} bytes"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a safetensors file: bad header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file: its header is not an object")
    end = 0
    count = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} has no valid data_offsets") from exc
        count += not name.endswith(_SKIPPED_SUFFIXES)
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {8 + header_len + end} bytes but the file "
            f"has {size}; download it again"
        )
    return count


def read_parts(source: Any, plan: ReadPlan) -> torch.Tensor:
    """The parts ``plan`` names of ``source``: a tensor, or a safetensors slice (which
    then reads only those bytes from the file)."""
    dim, spans = plan
    lead = (slice(None),) * dim
    parts = [source[(*lead, slice(start, end))] for start, end in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def iter_safetensors(
    files: Sequence[Path],
    dtype: torch.dtype | None,
    select: Callable[[str], bool] | None = None,
    narrow: Narrow | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in ``dtype``) for every tensor of ``files``, in file order;
    ``dtype=None`` keeps each tensor's stored dtype. ``select``: only the names it
    accepts are read (a pipeline stage's layers). ``narrow``: only the parts it names of
    each tensor are read (a tensor-parallel rank's rows or columns)."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"cannot open {path} as safetensors: {exc}") from exc
        with handle as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(_SKIPPED_SUFFIXES):
                    continue
                if select is not None and not select(name):
                    continue
                plan = None
                if narrow is not None:
                    part = reader.get_slice(name)
                    plan = narrow(name, tuple(part.get_shape()))
                tensor = reader.get_tensor(name) if plan is None else read_parts(part, plan)
                yield name, tensor if dtype is None else tensor.to(dtype)
