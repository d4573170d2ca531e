"""Adapters in a fixed number of device slots, swapped in least recently used first from a
host cache, and the per-step view the model reads (:class:`LoraBatch`).

Each of the model's merged matrices (:class:`~kvrun.lora.targets.LoraMatrix`) has, per
layer, ``A [max_loras, parts * max_lora_rank, in]`` and ``B [max_loras, out,
parts * max_lora_rank]``. An adapter of rank r fills its modules' blocks (the rest stays
zero, which adds exact zeros), so one ``add_lora`` call per matrix applies every
token's adapter, whatever its rank and modules.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.lora.adapter import LoraAdapter, LoraError, load_adapter
from kvrun.lora.request import LoRARequest
from kvrun.lora.targets import LoraTargets

__all__ = ["NO_SLOT", "LoraBatch", "LoraManager"]

logger = logging.getLogger(__name__)

NO_SLOT = -1  # a token that runs without an adapter


@dataclass
class LoraBatch:
    """One step's adapters as the model reads them."""

    add_lora: Callable[..., Any]  # the platform's op (kvrun.ops.reference.add_lora)
    # per layer: matrix name -> (A [S, R', in], B [S, out, R']) over every slot
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    scales: torch.Tensor  # [S] float32 per slot
    slots: torch.Tensor  # [T] int64: each token's slot, NO_SLOT for none

    def apply(self, layer: int, matrix: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` ([T, N], the projection of ``x`` [T, K]) plus each token's adapter."""
        a, b = self.layers[layer][matrix]
        out: torch.Tensor = self.add_lora(y, x, a, b, self.scales, self.slots)
        return out


class LoraManager:
    """Known adapters, a host cache of ``max_cpu_loras`` and ``max_loras`` device slots.

    Invariants:
    - :meth:`add` reads and checks an adapter before any request runs with it, so a
      broken adapter is refused then, never in a step.
    - A step names at most ``max_loras`` distinct adapters (the scheduler admits no more
      at once); :meth:`activate` keeps those in slots, evicting the least recently used
      slot not needed by the step.
    - An adapter evicted from the host cache is read again from its path when a step
      needs it in a slot.
    """

    def __init__(
        self,
        targets: LoraTargets,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
        dtype: torch.dtype,
        device: torch.device,
        add_lora: Callable[..., Any],
    ) -> None:
        assert 1 <= max_loras <= max_cpu_loras and max_lora_rank >= 1
        self.targets = targets
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.add_lora = add_lora
        r = max_lora_rank
        self._layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [
            {
                m.name: (
                    torch.zeros(max_loras, m.parts * r, m.in_features, dtype=dtype, device=device),
                    torch.zeros(max_loras, m.out_features, m.parts * r, dtype=dtype, device=device),
                )
                for m in targets.matrices
            }
            for _ in range(targets.num_layers)
        ]
        self._scales = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self._known: dict[int, LoRARequest] = {}
        self._host: OrderedDict[int, LoraAdapter] = OrderedDict()  # LRU, oldest first
        self._slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        self._free_slots = list(range(max_loras))
        self.num_reads = 0  # adapters read from disk
        self.num_slot_loads = 0  # adapters copied into a device slot

    # adapters --------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> None:
        """Know ``request``'s adapter, reading it now unless the host cache holds it;
        LoraError when it cannot run (then nothing changes)."""
        known = self._known.get(request.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (
            request.lora_name,
            request.lora_path,
        ):
            raise LoraError(
                f"lora_int_id={request.lora_int_id} already names adapter "
                f"{known.lora_name!r}; give each adapter its own id"
            )
        if request.lora_int_id in self._host:
            self._host.move_to_end(request.lora_int_id)
            return
        adapter = load_adapter(request, self.targets, self.max_lora_rank)
        self.num_reads += 1
        self._known[request.lora_int_id] = request
        self._cache(adapter)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (host copy and slot); False when it was not known. A running
        request that still names it reads it again from its path."""
        if self._known.pop(lora_id, None) is None:
            return False
        self._host.pop(lora_id, None)
        slot = self._slots.pop(lora_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        return True

    def list_loras(self) -> list[int]:
        return sorted(self._known)

    def _cache(self, adapter: LoraAdapter) -> None:
        self._host[adapter.request.lora_int_id] = adapter
        while len(self._host) > self.max_cpu_loras:
            evicted, _ = self._host.popitem(last=False)
            logger.debug("LoRA adapter %d left the host cache", evicted)

    # the step --------------------------------------------------------------------------
    def activate(self, lora_ids: Sequence[int]) -> list[int]:
        """The slot of each id (0: none -> NO_SLOT), loading adapters into slots as needed."""
        wanted = {i for i in lora_ids if i}
        assert len(wanted) <= self.max_loras, (
            f"a step names {len(wanted)} adapters, more than max_loras={self.max_loras}"
        )
        for lora_id in wanted:
            if lora_id in self._slots:
                self._slots.move_to_end(lora_id)
                continue
            if self._free_slots:
                slot = self._free_slots.pop(0)
            else:
                victim = next(i for i in self._slots if i not in wanted)
                slot = self._slots.pop(victim)
            self._load_slot(slot, self._adapter(lora_id))
            self._slots[lora_id] = slot
        return [self._slots[i] if i else NO_SLOT for i in lora_ids]

    def batch(self, token_slots: torch.Tensor) -> LoraBatch:
        """The model's view of this step: ``token_slots`` [T] from :meth:`activate`."""
        return LoraBatch(self.add_lora, self._layers, self._scales, token_slots)

    def _adapter(self, lora_id: int) -> LoraAdapter:
        adapter = self._host.get(lora_id)
        if adapter is not None:
            self._host.move_to_end(lora_id)
            return adapter
        request = self._known.get(lora_id)
        if request is None:
            raise LoraError(f"lora_int_id={lora_id} names no adapter this engine knows")
        adapter = load_adapter(request, self.targets, self.max_lora_rank)
        self.num_reads += 1
        self._cache(adapter)
        return adapter

    def _load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        r = self.max_lora_rank
        for layer in self._layers:
            for a, b in layer.values():
                a[slot].zero_()
                b[slot].zero_()
        for (index, module), (lora_a, lora_b) in adapter.weights.items():
            target = self.targets.modules[module]
            a, b = self._layers[index][target.matrix]
            start = target.part * r
            rank = lora_a.shape[0]
            a[slot, start : start + rank] = lora_a.to(self.dtype)
            b[slot, target.rows[0] : target.rows[1], start : start + rank] = lora_b.to(self.dtype)
        self._scales[slot] = adapter.scale
        self.num_slot_loads += 1
