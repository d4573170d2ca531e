"""Reading a LoRA adapter in PEFT's format, with every refusal naming what is wrong.

A PEFT adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, optionally ``use_rslora``) and ``adapter_model.safetensors`` whose
tensors are named ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
([r, in]) and ``...lora_B.weight`` ([out, r]). The adapter changes a projection
``y = x W^T`` into ``y + scale (x A^T) B^T`` with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA); ``rank_pattern`` and ``alpha_pattern`` give
some modules their own r and alpha (PEFT's rule: the first pattern that matches the
module's full name, or its tail after a dot), whose scale is folded into their B so
that a slot keeps one scale. A multimodal model's language model is
``model.language_model.layers.N`` (transformers 5); its encoders are refused by name.

A mixture's fused experts (``experts.gate_up_proj`` [E, out, in]) are adapted through
``target_parameters``: PEFT stores one ``lora_A`` [E r, in] and ``lora_B`` [out, E r]
per parameter, expert e's factors being A's rows ``e r .. e r + r`` and B's columns
``j E + e``. PEFT names the tensors by module, not parameter: with both parameters
targeted, the first the module registers (gate_up_proj) is the inner wrapper,
``experts.base_layer.lora_A``, the other ``experts.lora_A``.

Messages name the adapter and the file, never the directory: the server passes them to
clients, who must not learn the server's filesystem from them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.errors import RequestError
from kvrun.lora.request import LoRARequest
from kvrun.lora.targets import LoraTargets

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "LoraAdapter", "LoraError", "load_adapter"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT's tensor names; ".default" appears in state dicts saved without PEFT's renaming.
_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
    r"(?:self_attn|mlp|block_sparse_moe)\.([A-Za-z0-9_.]+?)\.lora_([AB])(?:\.default)?\.weight$"
)
# transformers 4's expert modules (block_sparse_moe.experts.3.w1, mlp.experts.3.gate_proj)
_EXPERT_MODULE = re.compile(r"experts\.(\d+)\.([A-Za-z0-9_]+)")
_SUFFIX = re.compile(r"\.lora_[AB](?:\.default)?\.weight$")
# adapter_config.json keys whose non-default values change the arithmetic kvrun runs.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "lora_bias": "LoRA biases (lora_bias)",
}


class LoraError(RequestError):
    """An adapter kvrun cannot load; the server answers 400 with this message."""

    def __init__(self, message: str, *, param: str = "lora_request") -> None:
        super().__init__(message, param=param)


@dataclass
class LoraAdapter:
    """One adapter's weights on the host, checked against the model's LoRA surface."""

    request: LoRARequest
    rank: int  # r
    scale: float  # lora_alpha / r (or / sqrt(r) under rsLoRA)
    # (layer, PEFT module) -> (A [r, in], B [out rows of the module, r]); an expert
    # module's are per expert: (A [E, r, in], B [E, out rows, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter(request: LoRARequest, targets: LoraTargets, max_rank: int) -> LoraAdapter:
    """The adapter ``request`` names, read from its directory; LoraError when it is not a
    PEFT LoRA adapter this model can run (rank above ``max_rank`` included)."""
    name = request.lora_name
    config = _read_config(request.lora_path, name)
    ranks = _Ranks.read(config, name, max_rank)
    _check_target_names(config.get("target_modules"), targets, name)
    aliases = _expert_aliases(config.get("target_parameters"), targets, name)
    tensors = _read_weights(request.lora_path, name)
    weights = _pair_weights(tensors, targets, name, ranks, aliases)
    return LoraAdapter(request, ranks.rank, ranks.scale(ranks.rank, ranks.alpha), weights)


def _fail(name: str, message: str) -> LoraError:
    return LoraError(f"LoRA adapter {name!r}: {message}")


def _read_config(path: str, name: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise _fail(name, "its lora_path is not a directory (PEFT's format is a directory)")
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _fail(name, f"{CONFIG_FILE} is missing from its directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _fail(name, f"{CONFIG_FILE} cannot be read ({why})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(name, f"{CONFIG_FILE} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _fail(name, f"{CONFIG_FILE} is not a JSON object")
    return config


@dataclass(frozen=True)
class _Ranks:
    """An adapter's r and lora_alpha, and the modules that have their own."""

    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def read(cls, config: dict[str, Any], name: str, max_rank: int) -> _Ranks:
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise _fail(name, f"peft_type {peft_type!r} is not accepted; accepted: LORA")
        for key, what in _REFUSED_OPTIONS.items():
            if config.get(key):
                raise _fail(name, f"{what} are not supported by kvrun; accepted: plain LoRA")
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise _fail(name, f"{CONFIG_FILE} has r={rank!r}; accepted: an integer >= 1")
        alpha = config.get("lora_alpha", 8)
        if not _is_number(alpha):
            raise _fail(name, f"{CONFIG_FILE} has lora_alpha={alpha!r}; accepted: a number")
        ranks = cls._pattern(config, "rank_pattern", name, lambda v: _is_int(v) and v >= 1)
        alphas = cls._pattern(config, "alpha_pattern", name, _is_number)
        top = max([rank, *ranks.values()])
        if top > max_rank:
            raise _fail(
                name,
                f"its rank r={top} is above max_lora_rank={max_rank}; start the engine with "
                f"max_lora_rank >= {top} (--max-lora-rank)",
            )
        rslora = bool(config.get("use_rslora", False))
        return cls(rank, float(alpha), rslora, ranks, {k: float(v) for k, v in alphas.items()})

    @staticmethod
    def _pattern(
        config: dict[str, Any], key: str, name: str, valid: Callable[[Any], bool]
    ) -> dict[str, Any]:
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and valid(v) for k, v in pattern.items()
        ):
            raise _fail(name, f"{CONFIG_FILE} has {key}={pattern!r}; accepted: module -> number")
        return pattern

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def of(self, module: str) -> tuple[int, float]:
        """(r, scale) of the module named ``module`` (its full name, PEFT's rule)."""
        rank = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.rank)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return rank, self.scale(rank, alpha)


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), "")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_target_names(listed: object, targets: LoraTargets, name: str) -> None:
    """A listed target_modules name the model lacks is refused before any weight is read
    (a regex string or "all-linear" is checked against the tensors instead)."""
    if not isinstance(listed, list):
        return
    for module in listed:
        if module not in targets.modules and f"experts.{module}" not in targets.modules:
            raise _unknown_module(name, str(module), targets)


def _expert_aliases(listed: object, targets: LoraTargets, name: str) -> dict[str, str]:
    """PEFT's module name of each targeted expert parameter -> the parameter's name
    (``experts.base_layer`` -> ``experts.gate_up_proj``; the module docstring)."""
    if not listed:
        return {}
    accepted = targets.parameters
    what = ", ".join(accepted) if accepted else f"none (no parameter of {targets.architecture})"
    if not isinstance(listed, list):
        raise _fail(name, f"{CONFIG_FILE} has target_parameters={listed!r}; accepted: a list")
    chosen = set()
    for entry in listed:
        # PEFT's rule: the parameter's full name is the entry or ends with "." + entry
        text = str(entry)
        found = [p for p in accepted if _tail_match(p, text) or text.endswith("." + p)]
        if not found:
            raise _fail(
                name,
                f"target parameter {entry!r} is not a parameter kvrun adapts in "
                f"{targets.architecture}; accepted: {what}",
            )
        chosen.update(found)
    targeted = [p for p in accepted if p in chosen]
    depth = len(targeted) - 1
    return {"experts" + ".base_layer" * (depth - k): p for k, p in enumerate(targeted)}


def _tail_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _encoder_module(key: str, targets: LoraTargets) -> str | None:
    """The module ``key`` adapts when it belongs to a media encoder, else None."""
    module = _SUFFIX.sub("", key.removeprefix("base_model.model."))
    parts = module.split(".")
    return module if any(e in parts for e in targets.encoders) else None


def _unknown_module(name: str, module: str, targets: LoraTargets) -> LoraError:
    return _fail(
        name,
        f"target module {module!r} is not a projection kvrun adapts in "
        f"{targets.architecture}; accepted: {', '.join(sorted(targets.modules))}",
    )


def _read_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        other = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        hint = " (kvrun reads no adapter_model.bin: save with safe_serialization)" if other else ""
        raise _fail(name, f"{WEIGHTS_FILE} is missing from its directory{hint}")
    try:
        return load_file(file)
    except SafetensorError as exc:
        raise _fail(name, f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise _fail(name, f"{WEIGHTS_FILE} cannot be read ({exc.strerror})") from None


def _fuse_experts(
    halves: dict[str, dict[int, torch.Tensor]],
    targets: LoraTargets,
    name: str,
    layer: int,
    module: str,
) -> dict[str, torch.Tensor]:
    """One layer's per-expert modules (transformers 4: A [r, in], B [out, r] for each
    expert) in the fused parameter's layout, lora_A [E r, in] and lora_B [out, E r] (the
    module docstring); an expert without weights gets zeros (it is left unchanged)."""
    experts = targets.matrix(targets.modules[module].matrix).experts
    if set(halves) != {"A", "B"} or set(halves["A"]) != set(halves["B"]):
        raise _fail(name, f"layer {layer} {module}: an expert has lora_A without lora_B or back")
    if max(halves["A"]) >= experts:
        raise _fail(
            name,
            f"layer {layer} {module} names expert {max(halves['A'])}, but the model has "
            f"{experts} experts",
        )
    first_a, first_b = next(iter(halves["A"].values())), next(iter(halves["B"].values()))
    rank = first_a.shape[0]
    if any(a.shape != first_a.shape for a in halves["A"].values()) or any(
        b.shape != first_b.shape for b in halves["B"].values()
    ):
        raise _fail(name, f"layer {layer} {module}: its experts' lora_A or lora_B differ in shape")
    a = first_a.new_zeros(experts, *first_a.shape)
    b = first_b.new_zeros(first_b.shape[0], rank, experts)
    for e, tensor in halves["A"].items():
        a[e] = tensor
    for e, tensor in halves["B"].items():
        b[:, :, e] = tensor
    return {"A": a.reshape(experts * rank, -1), "B": b.reshape(first_b.shape[0], -1)}


def _pair_weights(
    tensors: dict[str, torch.Tensor],
    targets: LoraTargets,
    name: str,
    ranks: _Ranks,
    aliases: dict[str, str],
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    full_names: dict[tuple[int, str], str] = {}  # the module's name, as patterns match it
    # transformers 4's expert modules: (layer, experts.w1) -> A|B -> expert -> tensor
    by_expert: dict[tuple[int, str], dict[str, dict[int, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _NAME.match(key)
        encoder = _encoder_module(key, targets) if targets.encoders else None
        if encoder is not None:
            raise _fail(
                name,
                f"it adapts {encoder!r}, a module of the media encoder; kvrun applies "
                f"adapters to the language model only (accepted modules: "
                f"{', '.join(sorted(targets.modules))} of model.language_model.layers.N)",
            )
        if match is None:
            raise _fail(
                name,
                f"tensor {key[:120]!r} is not a LoRA weight of an attention or MLP projection "
                "(accepted: base_model.model.model.layers.N.self_attn|mlp.MODULE"
                ".lora_A|lora_B.weight)",
            )
        layer, module, half = int(match[1]), match[2], match[3]
        full = _SUFFIX.sub("", key.removeprefix("base_model.model."))
        if module in aliases:  # PEFT's wrapper module -> the parameter it adapts
            full = full.removesuffix(module) + aliases[module]
            module = aliases[module]
        expert = _EXPERT_MODULE.fullmatch(module)
        if expert is not None:
            module = f"experts.{expert[2]}"
        if module not in targets.modules:
            raise _unknown_module(name, module, targets)
        if layer >= targets.num_layers:
            raise _fail(
                name,
                f"tensor {key!r} names layer {layer}, but the model has "
                f"{targets.num_layers} layers",
            )
        if not tensor.is_floating_point():
            raise _fail(name, f"tensor {key!r} has dtype {tensor.dtype}; accepted: floats")
        full_names[(layer, module)] = full
        if expert is None:
            halves.setdefault((layer, module), {})[half] = tensor
        else:
            by_expert.setdefault((layer, module), {}).setdefault(half, {})[int(expert[1])] = tensor
    for (layer, module), expert_halves in by_expert.items():
        halves[(layer, module)] = _fuse_experts(expert_halves, targets, name, layer, module)
    if not halves:
        raise _fail(name, f"{WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    filled: dict[tuple[int, str, int], str] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise _fail(name, f"layer {layer} {module} has no {lacking} weight")
        target = targets.modules[module]
        if not targets.has(layer, target.matrix):
            raise _fail(name, f"layer {layer} of {targets.architecture} has no {module}")
        matrix = targets.matrix(target.matrix)
        out_rows = target.rows[1] - target.rows[0]
        a, b = pair["A"], pair["B"]
        rank, scale = ranks.of(full_names[(layer, module)])
        r = rank * max(1, matrix.experts)  # an expert module's rank holds every expert's
        if tuple(a.shape) != (r, matrix.in_features) or tuple(b.shape) != (out_rows, r):
            raise _fail(
                name,
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                f"do not fit; accepted: lora_A ({r}, {matrix.in_features}) and lora_B "
                f"({out_rows}, {r}) for r={rank} on this model",
            )
        if matrix.experts:  # per expert: A [E, r, in], B [E, out, r] (module docstring)
            a = a.reshape(matrix.experts, rank, matrix.in_features)
            b = b.reshape(out_rows, rank, matrix.experts).permute(2, 0, 1).contiguous()
        ratio = scale / ranks.scale(ranks.rank, ranks.alpha)
        if ratio != 1.0:  # its own r or alpha: its scale relative to the slot's, in B
            b = b.float() * ratio
        slot = (layer, target.matrix, target.part)
        if slot in filled:
            raise _fail(name, f"layer {layer} has both {filled[slot]} and {module}")
        filled[slot] = module
        weights[(layer, module)] = (a, b)
    return weights
