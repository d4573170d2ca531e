"""Adapters in a fixed number of device slots, swapped in least recently used first from a
host cache, and the per-step view the model reads (:class:`LoraBatch`).

Each of the model's merged matrices (:class:`~kvrun.lora.targets.LoraMatrix`) has, in
each layer that has it, ``A [max_loras, parts * max_lora_rank, in]`` and ``B [max_loras,
out, parts * max_lora_rank]`` (an expert matrix: ``[experts, max_loras, ...]``, so
that one expert's slots are contiguous, as the native ``add_lora`` reads them). An adapter of rank r fills its modules' blocks (the rest stays
zero, which adds exact zeros), so one ``add_lora`` call per matrix applies every
token's adapter, whatever its rank and modules.

Slots are decided by :class:`~kvrun.lora.slots.SlotTable`. In-process the manager
decides and fills them (:meth:`LoraManager.activate`); on a rank of the mp or Ray
executor it *follows* the engine's decisions (``follows_engine=True``): each step message
names the adapters to read into slots first (:meth:`LoraManager.place`) and each chunk's
slot, and :meth:`LoraManager.activate` only looks the slots up.
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
from kvrun.lora.slots import NO_SLOT, SlotTable
from kvrun.lora.targets import LoraMatrix, LoraTargets

__all__ = ["NO_SLOT", "LoraBatch", "LoraManager"]

logger = logging.getLogger(__name__)


@dataclass
class LoraBatch:
    """One step's adapters as the model reads them."""

    add_lora: Callable[..., Any]  # the platform's op (kvrun.ops.reference.add_lora)
    # per layer: matrix name -> (A [S, R', in], B [S, out, R']) over every slot, for
    # the matrices the layer has (an expert matrix: A [E, S, R', in], B [E, S, out, R'])
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    scales: torch.Tensor  # [S] float32 per slot
    slots: torch.Tensor  # [T] int64: each token's slot, NO_SLOT for none
    # whether an adapter of this step changes a mixture's routed experts (then the
    # mixture runs its experts with their deltas, kvrun.models.moe.lora_moe_mlp)
    adapts_experts: bool = False

    def apply(self, layer: int, matrix: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` ([T, N], the projection of ``x`` [T, K]) plus each token's adapter."""
        a, b = self.layers[layer][matrix]
        out: torch.Tensor = self.add_lora(y, x, a, b, self.scales, self.slots)
        return out

    def apply_rows(
        self,
        layer: int,
        matrix: str,
        x: torch.Tensor,  # [n, K] some of the step's rows
        y: torch.Tensor,  # [n, N] their projection
        rows: torch.Tensor,  # [n] int64: which of the step's tokens each row is
        expert: int | None = None,  # an expert matrix's expert
    ) -> torch.Tensor:
        """:meth:`apply` for some rows of the step (a mixture's chunk, or the tokens
        routed to one expert); ``y`` unchanged where the layer lacks ``matrix``."""
        pair = self.layers[layer].get(matrix)
        if pair is None:
            return y
        a, b = pair if expert is None else (pair[0][expert], pair[1][expert])
        out: torch.Tensor = self.add_lora(y, x, a, b, self.scales, self.slots.index_select(0, rows))
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
        read: Callable[[LoRARequest], LoraAdapter] | None = None,
        follows_engine: bool = False,
    ) -> None:
        """``read``: how an adapter is read (default: load_adapter against ``targets``; a
        tensor-parallel rank reads the whole adapter and keeps its shard,
        kvrun.lora.sharding). ``follows_engine``: slots are placed by the engine's step
        messages (:meth:`place`), never chosen here."""
        assert 1 <= max_loras <= max_cpu_loras and max_lora_rank >= 1
        self.targets = targets
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.add_lora = add_lora
        self._read = read or (lambda request: load_adapter(request, targets, max_lora_rank))
        self.follows_engine = follows_engine
        r = max_lora_rank

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        def slots(m: LoraMatrix) -> tuple[torch.Tensor, torch.Tensor]:
            experts = (m.experts,) if m.experts else ()
            return (
                zeros(*experts, max_loras, m.parts * r, m.in_features),
                zeros(*experts, max_loras, m.out_features, m.parts * r),
            )

        self._layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [
            {m.name: slots(m) for m in targets.matrices if targets.has(i, m.name)}
            for i in range(targets.num_layers)
        ]
        self._scales = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self._known: dict[int, LoRARequest] = {}
        self._host: OrderedDict[int, LoraAdapter] = OrderedDict()  # LRU, oldest first
        self._table = SlotTable(max_loras)
        experts = {m.name for m in targets.matrices if m.experts}
        self._expert_modules = {n for n, t in targets.modules.items() if t.matrix in experts}
        self._expert_slots: set[int] = set()  # slots whose adapter changes experts
        self._step_adapts_experts = False
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
        adapter = self._read(request)
        self.num_reads += 1
        self._known[request.lora_int_id] = request
        self._cache(adapter)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (host copy and slot); False when it was not known. A running
        request that still names it reads it again from its path."""
        if self._known.pop(lora_id, None) is None:
            return False
        self._host.pop(lora_id, None)
        self._table.release(lora_id)
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
        """The slot of each id (0: none -> NO_SLOT), loading adapters into slots as needed
        (following the engine: the slots its messages placed them in)."""
        if self.follows_engine:
            slots = [self._placed_slot(i) if i else NO_SLOT for i in lora_ids]
        else:
            slots, loads = self._table.assign(lora_ids)
            for slot, lora_id in loads:
                try:
                    self._load_slot(slot, self._adapter(lora_id))
                except BaseException:
                    self._table.release(lora_id)  # the slot holds no whole adapter now
                    raise
        self._step_adapts_experts = any(s in self._expert_slots for s in slots if s != NO_SLOT)
        return slots

    def place(self, slot: int, request: LoRARequest) -> None:
        """Read ``request``'s adapter into ``slot`` (replacing what it held), as the
        engine's step message says (``follows_engine``)."""
        self._known[request.lora_int_id] = request
        cached = self._host.get(request.lora_int_id)
        if cached is not None and cached.request != request:  # the id was given again
            del self._host[request.lora_int_id]
        self._table.place(slot, request.lora_int_id)
        self._load_slot(slot, self._adapter(request.lora_int_id))

    def forget(self, lora_id: int) -> None:
        """Drop a removed adapter's host copy and slot (the engine's step message says)."""
        self.remove(lora_id)

    def _placed_slot(self, lora_id: int) -> int:
        slot = self._table.slot_of(lora_id)
        if slot is None:
            raise LoraError(f"adapter {lora_id} was never placed in a slot on this rank")
        return slot

    def slot_tensors(
        self,
    ) -> tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]:
        """Every layer's slot tensors (matrix name -> (A, B), as :class:`LoraBatch`'s
        ``layers``) and the slots' scales [S]: the same tensors for the manager's life,
        written in place as adapters enter slots, so a fused step may keep them."""
        return self._layers, self._scales

    def batch(self, token_slots: torch.Tensor) -> LoraBatch:
        """The model's view of this step: ``token_slots`` [T] from :meth:`activate`."""
        return LoraBatch(
            self.add_lora, self._layers, self._scales, token_slots, self._step_adapts_experts
        )

    def _adapter(self, lora_id: int) -> LoraAdapter:
        adapter = self._host.get(lora_id)
        if adapter is not None:
            self._host.move_to_end(lora_id)
            return adapter
        request = self._known.get(lora_id)
        if request is None:
            raise LoraError(f"lora_int_id={lora_id} names no adapter this engine knows")
        adapter = self._read(request)
        self.num_reads += 1
        self._cache(adapter)
        return adapter

    def _load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        r = self.max_lora_rank
        experts = {m.name for m in self.targets.matrices if m.experts}

        def at(matrix: str) -> tuple[Any, ...]:  # the slot's index (experts lead)
            return (slice(None), slot) if matrix in experts else (slot,)

        for layer in self._layers:
            for name, (a, b) in layer.items():
                a[at(name)].zero_()
                b[at(name)].zero_()
        for (index, module), (lora_a, lora_b) in adapter.weights.items():
            target = self.targets.modules[module]
            a, b = self._layers[index][target.matrix]
            start = target.part * r
            rank = lora_a.shape[-2]
            rows = slice(*target.rows)
            a[at(target.matrix)][..., start : start + rank, :] = lora_a.to(self.dtype)
            b[at(target.matrix)][..., rows, start : start + rank] = lora_b.to(self.dtype)
        self._scales[slot] = adapter.scale
        self._expert_slots.discard(slot)
        if any(module in self._expert_modules for _, module in adapter.weights):
            self._expert_slots.add(slot)
        self.num_slot_loads += 1
