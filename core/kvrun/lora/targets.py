"""What a model offers adapters: its merged projections and where each PEFT module lands.

A Llama-family layer computes q|k|v and gate|up as single merged matrices; a PEFT
adapter names the separate modules (``q_proj``, ``up_proj``), so each module is a
*part* of a merged matrix: its A rows are one block of the matrix's LoRA rank and its
B fills the module's rows of the merged output. Phi-3 names the merged modules
themselves (``qkv_proj``, ``gate_up_proj``): one part covering every row.

Layers may differ: a mixture-of-experts model has dense MLPs in some layers and a
mixture (with its own shared-expert and expert matrices) in others, so a matrix names
the layers that have it. An *expert* matrix has one A and B per expert (PEFT's
``target_parameters`` on the fused ``experts.gate_up_proj`` / ``experts.down_proj``).
Module names are PEFT's, relative to the layer's ``self_attn.`` or ``mlp.``
(``q_proj``, ``shared_expert.gate_proj``, ``experts.gate_up_proj``); adapters made on
transformers 4, whose experts were modules (``block_sparse_moe.experts.3.w1``,
``mlp.experts.3.gate_proj``), name an expert's module ``experts.w1`` here, the expert's
index read from the tensor's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LoraMatrix", "LoraTarget", "LoraTargets", "attention_mlp_lora"]


@dataclass(frozen=True)
class LoraMatrix:
    """One merged projection that adapters may change, in every layer or those named."""

    name: str  # the model's name for it, e.g. "qkv"
    in_features: int  # K of the projection's input [T, K]
    out_features: int  # N of its output [T, N]
    parts: int  # PEFT modules that feed it (q, k, v: 3); its slot rank is parts x max rank
    layers: frozenset[int] | None = None  # the layers that have it; None: every layer
    experts: int = 0  # > 0: one A and B per expert (a mixture's routed experts)


@dataclass(frozen=True)
class LoraTarget:
    """Where one PEFT module (``q_proj``) lands."""

    matrix: str  # LoraMatrix.name
    part: int  # which block of the matrix's rank its A rows fill, 0 <= part < parts
    rows: tuple[int, int]  # [start, end) of the matrix's output rows its B fills


@dataclass(frozen=True)
class LoraTargets:
    """A model's LoRA surface (PEFT names layers by index)."""

    architecture: str
    num_layers: int
    matrices: tuple[LoraMatrix, ...]
    modules: Mapping[str, LoraTarget]  # PEFT module name -> target
    # Modules of a media encoder (e.g. "visual", "audio_tower"): adapters on them are
    # refused by name (kvrun adapts the language model only, as vLLM does by default).
    encoders: tuple[str, ...] = ()
    # The fused parameters adapters may name in target_parameters, in the order the
    # experts module registers them, which is the order PEFT nests its wrappers in
    # (``experts.gate_up_proj``, ``experts.down_proj``).
    parameters: tuple[str, ...] = ()

    def matrix(self, name: str) -> LoraMatrix:
        return next(m for m in self.matrices if m.name == name)

    def has(self, layer: int, matrix: str) -> bool:
        """Whether ``layer`` has ``matrix``."""
        layers = self.matrix(matrix).layers
        return layers is None or layer in layers


def attention_mlp_lora(
    q: int,  # query rows (Hq x D)
    kv: int,  # key rows, value rows (Hk x D each)
    hidden: int,
    inter: int,  # the dense MLP's intermediate size
    *,
    mlp_layers: frozenset[int] | None = None,  # the layers with a dense MLP; None: all
    merged_names: bool = False,  # also Phi-3's qkv_proj and gate_up_proj
) -> tuple[tuple[LoraMatrix, ...], dict[str, LoraTarget]]:
    """The Llama layout's matrices (qkv, o, gate_up, down) and PEFT modules."""
    matrices: tuple[LoraMatrix, ...] = (
        LoraMatrix("qkv", hidden, q + 2 * kv, parts=3),
        LoraMatrix("o", q, hidden, parts=1),
        LoraMatrix("gate_up", hidden, 2 * inter, parts=2, layers=mlp_layers),
        LoraMatrix("down", inter, hidden, parts=1, layers=mlp_layers),
    )
    modules = {
        "q_proj": LoraTarget("qkv", 0, (0, q)),
        "k_proj": LoraTarget("qkv", 1, (q, q + kv)),
        "v_proj": LoraTarget("qkv", 2, (q + kv, q + 2 * kv)),
        "o_proj": LoraTarget("o", 0, (0, hidden)),
        "gate_proj": LoraTarget("gate_up", 0, (0, inter)),
        "up_proj": LoraTarget("gate_up", 1, (inter, 2 * inter)),
        "down_proj": LoraTarget("down", 0, (0, hidden)),
    }
    if merged_names:
        modules["qkv_proj"] = LoraTarget("qkv", 0, (0, q + 2 * kv))
        modules["gate_up_proj"] = LoraTarget("gate_up", 0, (0, 2 * inter))
    if mlp_layers is not None and not mlp_layers:  # no dense MLP anywhere (Mixtral)
        matrices = matrices[:2]
        for name in ("gate_proj", "up_proj", "down_proj"):
            del modules[name]
    return matrices, modules
