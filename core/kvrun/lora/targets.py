"""What a model offers adapters: its merged projections and where each PEFT module lands.

A Llama-family layer computes q|k|v and gate|up as single merged matrices; a PEFT
adapter names the separate modules (``q_proj``, ``up_proj``), so each module is a
*part* of a merged matrix: its A rows are one block of the matrix's LoRA rank and its
B fills the module's rows of the merged output. Phi-3 names the merged modules
themselves (``qkv_proj``, ``gate_up_proj``): one part covering every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LoraMatrix", "LoraTarget", "LoraTargets"]


@dataclass(frozen=True)
class LoraMatrix:
    """One merged projection of every layer that adapters may change."""

    name: str  # the model's name for it, e.g. "qkv"
    in_features: int  # K of the projection's input [T, K]
    out_features: int  # N of its output [T, N]
    parts: int  # PEFT modules that feed it (q, k, v: 3); its slot rank is parts x max rank


@dataclass(frozen=True)
class LoraTarget:
    """Where one PEFT module (``q_proj``) lands."""

    matrix: str  # LoraMatrix.name
    part: int  # which block of the matrix's rank its A rows fill, 0 <= part < parts
    rows: tuple[int, int]  # [start, end) of the matrix's output rows its B fills


@dataclass(frozen=True)
class LoraTargets:
    """A model's LoRA surface: every layer has each matrix (PEFT names layers by index)."""

    architecture: str
    num_layers: int
    matrices: tuple[LoraMatrix, ...]
    modules: Mapping[str, LoraTarget]  # PEFT module name -> target

    def matrix(self, name: str) -> LoraMatrix:
        return next(m for m in self.matrices if m.name == name)
