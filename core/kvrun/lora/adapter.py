"""Reading a LoRA adapter in PEFT's format, with every refusal naming what is wrong.

A PEFT adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, optionally ``use_rslora``) and ``adapter_model.safetensors`` whose
tensors are named ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
([r, in]) and ``...lora_B.weight`` ([out, r]). The adapter changes a projection
``y = x W^T`` into ``y + scale (x A^T) B^T`` with ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA).

Messages name the adapter and the file, never the directory: the server passes them to
clients, who must not learn the server's filesystem from them.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"([A-Za-z0-9_]+)\.lora_([AB])(?:\.default)?\.weight$"
)
# adapter_config.json keys whose non-default values change the arithmetic kvrun runs.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA adapters",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
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
    # (layer, PEFT module) -> (A [r, in], B [out rows of the module, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def load_adapter(request: LoRARequest, targets: LoraTargets, max_rank: int) -> LoraAdapter:
    """The adapter ``request`` names, read from its directory; LoraError when it is not a
    PEFT LoRA adapter this model can run (rank above ``max_rank`` included)."""
    name = request.lora_name
    config = _read_config(request.lora_path, name)
    rank, scale = _rank_and_scale(config, name, max_rank)
    _check_target_names(config.get("target_modules"), targets, name)
    tensors = _read_weights(request.lora_path, name)
    weights = _pair_weights(tensors, targets, name, rank)
    return LoraAdapter(request, rank, scale, weights)


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


def _rank_and_scale(config: dict[str, Any], name: str, max_rank: int) -> tuple[int, float]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _fail(name, f"peft_type {peft_type!r} is not accepted; accepted: LORA")
    for key, what in _REFUSED_OPTIONS.items():
        if config.get(key):
            raise _fail(name, f"{what} are not supported by kvrun; accepted: plain LoRA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _fail(name, f"{CONFIG_FILE} has r={rank!r}; accepted: an integer >= 1")
    if rank > max_rank:
        raise _fail(
            name,
            f"its rank r={rank} is above max_lora_rank={max_rank}; start the engine with "
            f"max_lora_rank >= {rank} (--max-lora-rank)",
        )
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _fail(name, f"{CONFIG_FILE} has lora_alpha={alpha!r}; accepted: a number")
    rslora = bool(config.get("use_rslora", False))
    return rank, float(alpha) / (math.sqrt(rank) if rslora else rank)


def _check_target_names(listed: object, targets: LoraTargets, name: str) -> None:
    """A listed target_modules name the model lacks is refused before any weight is read
    (a regex string or "all-linear" is checked against the tensors instead)."""
    if not isinstance(listed, list):
        return
    for module in listed:
        if module not in targets.modules:
            raise _unknown_module(name, str(module), targets)


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


def _pair_weights(
    tensors: dict[str, torch.Tensor], targets: LoraTargets, name: str, rank: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _NAME.match(key)
        if match is None:
            raise _fail(
                name,
                f"tensor {key[:120]!r} is not a LoRA weight of an attention or MLP projection "
                "(accepted: base_model.model.model.layers.N.self_attn|mlp.MODULE"
                ".lora_A|lora_B.weight)",
            )
        layer, module, half = int(match[1]), match[2], match[3]
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
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise _fail(name, f"{WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    filled: dict[tuple[int, str, int], str] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise _fail(name, f"layer {layer} {module} has no {lacking} weight")
        target = targets.modules[module]
        matrix = targets.matrix(target.matrix)
        out_rows = target.rows[1] - target.rows[0]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, matrix.in_features) or tuple(b.shape) != (out_rows, rank):
            raise _fail(
                name,
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                f"do not fit; accepted: lora_A ({rank}, {matrix.in_features}) and lora_B "
                f"({out_rows}, {rank}) for r={rank} on this model",
            )
        slot = (layer, target.matrix, target.part)
        if slot in filled:
            raise _fail(name, f"layer {layer} has both {filled[slot]} and {module}")
        filled[slot] = module
        weights[(layer, module)] = (a, b)
    return weights
