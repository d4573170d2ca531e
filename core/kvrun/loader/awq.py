"""AWQ checkpoints: 4-bit weights dequantised once, at load, or kept packed.

An AWQ ("GEMM" version) checkpoint stores each quantised linear layer ``P`` as three
tensors instead of ``P.weight [out, in]``:

- ``P.qweight`` int32 ``[in, out / 8]``: eight 4-bit values per word;
- ``P.qzeros`` int32 ``[in / group, out / 8]``: the zero point of each group, packed alike;
- ``P.scales`` float16 ``[in / group, out]``: the scale of each group;

and ``weight[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o]``. Within a word,
nibble ``n`` (bits ``4n .. 4n + 3``) holds column ``8 j + AWQ_ORDER[n]``: the
interleaving AutoAWQ's GEMM kernels read. config.json names the method in
``quantization_config`` (``quant_method: awq``, ``bits: 4``, ``group_size``,
``zero_point: true``, ``version: gemm``).

The model then runs on the dequantised weights in the engine's dtype, as GGUF files
do. The arithmetic is the ``awq_dequantize`` op (:mod:`kvrun.ops.reference` holds the
oracle), so a platform can do it with its own kernel on its own device: kvrun-cuda's
Triton kernel under VLLM_USE_TRITON_AWQ=1. This module checks the checkpoint and
gathers each layer's three tensors for the op.

Under ``quantization="awq"`` (:func:`kvrun.quantization.plan_quantized_load`) the
layers named in ``keep_quantized`` are not dequantised: their three tensors become one
:class:`kvrun.quantization.QuantizedMatrix` (:func:`kvrun.quantization.awq_rows`, the
same 4-bit values, scales and zero points by output row), which the platform repacks
for its int4 kernels (the cpu plugin's ``csrc/quant.c``). :func:`awq_stored_types`
says which layers can be, from the files' headers alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvrun.errors import ModelLoadError
from kvrun.ops.reference import awq_dequantize

__all__ = [
    "AwqConfig",
    "Dequantize",
    "awq_config",
    "awq_stored_types",
    "check_awq_shapes",
    "merge_awq",
]

_PARTS = ("qweight", "qzeros", "scales")
# The awq_dequantize op's signature: (qweight, qzeros, scales, group_size) -> [out, in].
Dequantize = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class AwqConfig:
    group_size: int  # input rows per scale and zero point; -1 = all of them


def awq_config(hf_config: Mapping[str, Any], source: str) -> AwqConfig | None:
    """The checkpoint's AWQ settings; None when it is not quantised; a ModelLoadError for
    a quantisation kvrun does not load, naming it and what is accepted."""
    quant = hf_config.get("quantization_config")
    if quant is None:
        return None
    method = str(quant.get("quant_method", "")).lower() if isinstance(quant, dict) else ""
    if method == "fp8":
        return None  # kvrun.loader.fp8
    if method != "awq":
        raise ModelLoadError(
            f"model {source!r}: config.json's quantization_config has quant_method "
            f"{method or quant!r}; kvrun loads AWQ (4-bit, GEMM layout) and fp8 "
            "(block-quantized e4m3) checkpoints and GGUF files, or unquantised weights"
        )
    bits = quant.get("bits", quant.get("w_bit", 4))
    version = str(quant.get("version", "gemm")).lower()
    zero_point = quant.get("zero_point", True)
    group_size = quant.get("group_size", quant.get("q_group_size", 128))
    problems = []
    if bits != 4:
        problems.append(f"bits={bits} (accepted: 4)")
    if version != "gemm":
        problems.append(f"version={version!r} (accepted: 'gemm')")
    if zero_point is not True:
        problems.append(f"zero_point={zero_point} (accepted: true)")
    if not isinstance(group_size, int) or not (group_size > 0 or group_size == -1):
        problems.append(f"group_size={group_size!r} (accepted: a positive integer or -1)")
    if problems:
        raise ModelLoadError(
            f"model {source!r}: an AWQ checkpoint kvrun cannot load: {'; '.join(problems)}"
        )
    return AwqConfig(group_size=group_size)


def check_awq_shapes(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> None:
    """A ValueError naming the shapes when one layer's three tensors do not fit together."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(
            f"qweight {tuple(qweight.shape)} {qweight.dtype} and qzeros {qzeros.dtype} must "
            "be 2-d int32 (eight 4-bit values per word)"
        )
    rows, words = qweight.shape
    group = rows if group_size == -1 else group_size
    groups = -(-rows // group)
    if tuple(qzeros.shape) != (groups, words) or tuple(scales.shape) != (groups, 8 * words):
        raise ValueError(
            f"qweight {(rows, words)} with group size {group} needs qzeros "
            f"{(groups, words)} and scales {(groups, 8 * words)}; got "
            f"{tuple(qzeros.shape)} and {tuple(scales.shape)}"
        )


def awq_stored_types(weight_files: Iterable[Path], config: AwqConfig) -> dict[str, str]:
    """Every AWQ layer of these safetensors files as ``{"<layer>.weight": "AWQ_G<g>"}``,
    g its group (``group_size``, or all its input rows for -1): a type
    :class:`kvrun.quantization.QuantizedMatrix` keeps where g is whole blocks of 32
    (:func:`kvrun.quantization.awq_qtype`), no kept type otherwise. Read from the
    files' headers; the tensors are not loaded."""
    from safetensors import safe_open

    types: dict[str, str] = {}
    for path in weight_files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if not name.endswith(".qweight"):
                    continue
                rows = handle.get_slice(name).get_shape()[0]
                group = rows if config.group_size == -1 else config.group_size
                types[name.removesuffix("qweight") + "weight"] = f"AWQ_G{group}"
    return types


def merge_awq(
    pairs: Iterable[tuple[str, torch.Tensor]],
    config: AwqConfig,
    dtype: torch.dtype,
    source: str,
    dequantize: Dequantize = awq_dequantize,
    device: torch.device | None = None,
    keep_quantized: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, Any]]:
    """Each layer's (qweight, qzeros, scales) as one ``.weight`` in ``dtype``, whatever
    order or file they come in; other tensors pass through, floating ones in ``dtype``.

    ``dequantize`` is the ``awq_dequantize`` op to use (a platform's kernel) and
    ``device`` where it runs: the three tensors move there first and the weight stays
    there (None: where they were read, the CPU). A layer whose ``.weight`` is in
    ``keep_quantized`` comes as a :class:`kvrun.quantization.QuantizedMatrix` instead,
    on the CPU (:func:`kvrun.quantization.awq_rows`)."""
    from kvrun.quantization import awq_rows

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        prefix, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == len(_PARTS):
            del pending[prefix]
            qweight, qzeros, scales = (parts[p] for p in _PARTS)
            try:
                check_awq_shapes(qweight, qzeros, scales, config.group_size)
            except ValueError as exc:
                raise ModelLoadError(f"model {source!r}: AWQ layer {prefix}: {exc}") from exc
            if f"{prefix}.weight" in keep_quantized:
                yield (
                    f"{prefix}.weight",
                    awq_rows(qweight, qzeros, scales, config.group_size, dtype),
                )
                continue
            if device is not None:
                qweight, qzeros, scales = qweight.to(device), qzeros.to(device), scales.to(device)
            weight = dequantize(qweight, qzeros, scales, config.group_size)
            yield f"{prefix}.weight", weight.to(dtype)
    if pending:
        prefix, parts = next(iter(pending.items()))
        missing = ", ".join(p for p in _PARTS if p not in parts)
        raise ModelLoadError(
            f"model {source!r}: AWQ layer {prefix} has no {missing} "
            f"({len(pending)} layer(s) incomplete); the checkpoint is damaged"
        )
