"""Weights from PyTorch ``.bin``/``.pt`` files (load_format ``pt``).

A pickle can run any code when it is loaded, so every file is read with
``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt, and a
file that needs anything more is refused with its name, before any of it runs. Files in
torch's zip format (everything ``torch.save`` wrote since PyTorch 1.6) are memory-mapped,
so a shard is not read into memory twice.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kvrun.errors import ModelLoadError
from kvrun.loader.formats import PT_SUFFIXES, TRAINING_FILES, indexed_shards

__all__ = ["find_pt_files", "iter_pt", "validate_pt"]

_INDEX = "pytorch_model.bin.index.json"
_SINGLE = ("pytorch_model.bin", "model.pt", "model.bin")
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def find_pt_files(directory: Path, source: str) -> tuple[Path, ...]:
    """The index's shards, else pytorch_model.bin, else every ``*.bin``/``*.pt`` weight file."""
    index = directory / _INDEX
    if index.is_file():
        return indexed_shards(index, source, "PyTorch weights")
    for name in _SINGLE:
        if (directory / name).is_file():
            return (directory / name,)
    files = tuple(
        sorted(
            p
            for p in directory.iterdir()
            if p.is_file() and p.suffix in PT_SUFFIXES and p.name not in TRAINING_FILES
        )
    )
    if not files:
        raise ModelLoadError(f"model {source!r}: no PyTorch *.bin / *.pt weights in {directory}")
    return files


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, rebuilt by the weights-only unpickler."""
    try:
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message: a boilerplate paragraph, then the reason ("Unsupported global:
        # GLOBAL posix.system ..."), then a pointer to its docs.
        paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
        reason = next((p for p in paragraphs if "GLOBAL" in p or "nsupported" in p), None)
        if reason is None:
            reason = paragraphs[0] if paragraphs else type(exc).__name__
        raise ModelLoadError(
            f"{path}: refused: this pickle needs more than tensors and plain containers "
            f"({reason.splitlines()[0]}); kvrun reads .bin/.pt files with "
            "torch.load(weights_only=True) and never runs code from a checkpoint. Convert "
            "it to safetensors where you trust it, or use a safetensors copy"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable PyTorch weights file: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        held = type(state).__name__
        if isinstance(state, dict):
            bad = next(
                (
                    k
                    for k, v in state.items()
                    if not (isinstance(k, str) and isinstance(v, torch.Tensor))
                ),
            )
            held = f"a dict whose {bad!r} is a {type(state[bad]).__name__}"
        raise ModelLoadError(
            f"{path} holds {held}; a weights file holds a flat dict of name -> tensor "
            "(a model's state_dict())"
        )
    return state


def validate_pt(path: Path) -> int:
    """Check that ``path`` loads as weights only; how many tensors :func:`iter_pt` yields."""
    return sum(not name.endswith(_SKIPPED_SUFFIXES) for name in _load(path))


def iter_pt(files: Sequence[Path], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in ``dtype``) for every tensor of ``files``, in file order;
    ``dtype=None`` keeps each tensor's stored dtype."""
    for path in files:
        state = _load(path)
        for name in list(state):
            tensor = state.pop(name)  # memory-mapped or not, dropped once handed out
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            # Always a copy: the caller owns a new tensor (Checkpoint.iter_weights' contract),
            # and tensors that shared storage in the pickle (tied weights) no longer do.
            yield name, tensor.to(dtype or tensor.dtype, copy=True)
