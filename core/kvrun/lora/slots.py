"""Which adapter sits in which of ``max_loras`` device slots, least recently used first out.

:class:`SlotTable` is the decision alone (no tensors): the in-process
:class:`~kvrun.lora.manager.LoraManager` fills the slots it names, and with the mp or
Ray executor :class:`ExecutorLoras` (in the engine process) makes the same decisions and
sends them to the ranks in each step message, whose own LoraManager fills its device
slots by them (:meth:`~kvrun.lora.manager.LoraManager.place`).

Invariants of :class:`SlotTable`: an adapter holds at most one slot and a slot at most
one adapter; :meth:`SlotTable.assign` for a step naming at most ``max_loras`` distinct
adapters gives each a slot, evicting only adapters the step does not name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.lora.adapter import LoraError, load_adapter
from kvrun.lora.request import LoRARequest
from kvrun.lora.targets import LoraTargets

__all__ = ["NO_SLOT", "ExecutorLoras", "LoraStepPlan", "SlotTable", "model_lora_targets"]

NO_SLOT = -1  # a token that runs without an adapter


class SlotTable:
    """Adapter ids in ``max_loras`` slots, least recently used first (module docstring)."""

    def __init__(self, max_loras: int) -> None:
        assert max_loras >= 1
        self.max_loras = max_loras
        self._slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        self._free = list(range(max_loras))

    def slot_of(self, lora_id: int) -> int | None:
        return self._slots.get(lora_id)

    def assign(self, lora_ids: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Each id's slot (0: none -> NO_SLOT) and the (slot, id) pairs that must be
        loaded for it, in order (each replaces whatever the slot held)."""
        wanted = list(dict.fromkeys(i for i in lora_ids if i))
        assert len(wanted) <= self.max_loras, (
            f"a step names {len(wanted)} adapters, more than max_loras={self.max_loras}"
        )
        loads: list[tuple[int, int]] = []
        for lora_id in wanted:
            if lora_id in self._slots:
                self._slots.move_to_end(lora_id)
                continue
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(i for i in self._slots if i not in wanted)
                slot = self._slots.pop(victim)
            self._slots[lora_id] = slot
            loads.append((slot, lora_id))
        return [self._slots[i] if i else NO_SLOT for i in lora_ids], loads

    def place(self, slot: int, lora_id: int) -> None:
        """Record that ``slot`` now holds ``lora_id`` (a rank following the engine's
        decisions): its former adapter, and ``lora_id``'s former slot, are forgotten."""
        if not 0 <= slot < self.max_loras:
            raise LoraError(f"LoRA slot {slot} is outside the {self.max_loras} slots")
        for other, held in list(self._slots.items()):
            if held == slot or other == lora_id:
                self.release(other)
        self._free.remove(slot)
        self._slots[lora_id] = slot

    def release(self, lora_id: int) -> None:
        """Free ``lora_id``'s slot, if it holds one."""
        slot = self._slots.pop(lora_id, None)
        if slot is not None:
            self._free.append(slot)


@dataclass(frozen=True)
class LoraStepPlan:
    """One step's adapters as the ranks need them (kvrun.executor.messages.LoraStep)."""

    slots: list[int]  # per chunk: its adapter's slot, NO_SLOT for none
    loads: list[tuple[int, LoRARequest]]  # (slot, adapter) to read into that slot first
    forget: list[int]  # adapter ids removed since the last step (ranks drop their copies)


class ExecutorLoras:
    """The engine side of LoRA with the mp or Ray executor: the adapters this engine
    knows and the slot each holds on the ranks. It keeps no weights: :meth:`add` reads
    an adapter once to refuse a broken one before any request runs with it (as
    LoraManager.add does), and the ranks read the files themselves from the path when a
    step first needs the adapter in a slot (a path every rank can read; on one machine,
    the engine's)."""

    def __init__(self, targets: LoraTargets, *, max_loras: int, max_lora_rank: int) -> None:
        self.targets = targets
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._table = SlotTable(max_loras)
        self._known: dict[int, LoRARequest] = {}
        self._forget: list[int] = []
        self.num_reads = 0  # adapters read here to check them

    def add(self, request: LoRARequest) -> None:
        known = self._known.get(request.lora_int_id)
        if known is not None:
            if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                raise LoraError(
                    f"lora_int_id={request.lora_int_id} already names adapter "
                    f"{known.lora_name!r}; give each adapter its own id"
                )
            return
        load_adapter(request, self.targets, self.max_lora_rank)  # LoraError if broken
        self.num_reads += 1
        self._known[request.lora_int_id] = request

    def remove(self, lora_id: int) -> bool:
        if self._known.pop(lora_id, None) is None:
            return False
        self._table.release(lora_id)
        self._forget.append(lora_id)
        return True

    def list_loras(self) -> list[int]:
        return sorted(self._known)

    def plan(self, lora_ids: Sequence[int]) -> LoraStepPlan:
        """The slots of a step's chunks (``lora_ids``, 0 = none) and what the ranks must
        load first; the adapters removed since the last plan."""
        unknown = sorted({i for i in lora_ids if i and i not in self._known})
        if unknown:
            raise LoraError(f"lora_int_id={unknown[0]} names no adapter this engine knows")
        slots, loads = self._table.assign(lora_ids)
        forget, self._forget = self._forget, []
        return LoraStepPlan(slots, [(s, self._known[i]) for s, i in loads], forget)


def model_lora_targets(
    model_cls: Any, model_config: Any, ops: Any, attention: Any, dtype: torch.dtype
) -> LoraTargets:
    """The LoRA surface of the whole model ``model_cls`` builds from ``model_config``,
    without its weights (built on the meta device: shapes only, no memory)."""
    model = model_cls(model_config, ops, attention, dtype, torch.device("meta"))
    targets: LoraTargets = model.lora_targets()
    return targets
