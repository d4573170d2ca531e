"""Filling a model's parameter tensors from a checkpoint's (name, tensor) stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from kvrun.errors import ModelLoadError

__all__ = ["fill_parameters"]


def fill_parameters(
    destinations: Mapping[str, torch.Tensor],
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    source: str,
    architecture: str,
    tied: bool,
    also_fills: Callable[[str], tuple[str, ...]] = lambda name: (),
) -> None:
    """Copy each (Hugging Face name, tensor) into ``destinations[name]``.

    Every destination must be filled, except those that another name fills for them
    (``also_fills(name)``: the names a merged weight such as Phi-3's ``qkv_proj``
    covers; a destination that covers others is itself optional). A weight with no
    destination, or of another shape, is a ModelLoadError naming it. Rotary frequency
    buffers and, for a ``tied`` model, a stored copy of the lm_head are skipped.
    """
    merged = {name for name in destinations if also_fills(name)}
    missing = set(destinations) - merged
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # some tied checkpoints still carry a copy
        target = destinations.get(name)
        if target is None:
            raise ModelLoadError(f"{source}: unexpected weight {name!r} for {architecture}")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
        missing.discard(name)
        missing.difference_update(also_fills(name))
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelLoadError(f"{source}: {len(missing)} weight(s) missing, e.g. {shown}")
