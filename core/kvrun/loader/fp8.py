"""fp8 block-quantized checkpoints (DeepSeek-V3's format): weights dequantized at load.

config.json names the method in ``quantization_config``: ``quant_method: fp8``,
``fmt: e4m3``, ``weight_block_size: [128, 128]``, ``activation_scheme: dynamic``. Each
quantized linear layer ``P`` is stored as

- ``P.weight`` float8_e4m3fn ``[N, K]``;
- ``P.weight_scale_inv`` float32 ``[ceil(N / bn), ceil(K / bk)]``: one scale per block
  of ``bn x bk`` values (the last row and column of blocks may be partial),

and ``weight[n, k] = P.weight[n, k] * weight_scale_inv[n // bn, k // bk]`` (the name is
historical: the stored value multiplies). Layers the checkpoint keeps unquantized
(norms, embeddings, the router, the lm_head) are stored as plain tensors and pass
through. The model then runs on the dequantized weights in the engine's dtype, as AWQ
and GGUF files do, so the only rounding left is the checkpoint's own: activations are
not quantized (vLLM's fp8 kernels quantize them per token group, "dynamic").

:func:`quantize_to_fp8_blocks` is the inverse (what a checkpoint writer does, and what
vLLM's MLA requantization does to the absorbed matrices: :func:`round_to_fp8_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.errors import ModelLoadError

__all__ = [
    "FP8_MAX",
    "Fp8Config",
    "dequantize_fp8_blocks",
    "fp8_config",
    "merge_fp8",
    "quantize_to_fp8_blocks",
    "round_to_fp8_blocks",
]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_SCALE = "weight_scale_inv"


@dataclass(frozen=True)
class Fp8Config:
    block: tuple[int, int]  # (rows, columns) of one scale's block


def fp8_config(hf_config: Mapping[str, Any], source: str) -> Fp8Config | None:
    """The checkpoint's fp8 settings; None when it is not an fp8 checkpoint; a
    ModelLoadError naming each setting kvrun cannot load and what is accepted."""
    quant = hf_config.get("quantization_config")
    if not isinstance(quant, Mapping) or str(quant.get("quant_method", "")).lower() != "fp8":
        return None
    problems = []
    fmt = str(quant.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        problems.append(f"fmt={fmt!r} (accepted: 'e4m3')")
    scheme = str(quant.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        problems.append(f"activation_scheme={scheme!r} (accepted: 'dynamic')")
    block = quant.get("weight_block_size")
    if block is None:
        problems.append(
            "no weight_block_size: per-tensor fp8 scales (weight_scale) are not loaded "
            "(accepted: a block size such as [128, 128] with weight_scale_inv tensors)"
        )
    elif not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        problems.append(f"weight_block_size={block!r} (accepted: two positive integers)")
    if problems:
        raise ModelLoadError(
            f"model {source!r}: an fp8 checkpoint kvrun cannot load: {'; '.join(problems)}"
        )
    assert block is not None
    return Fp8Config(block=(int(block[0]), int(block[1])))


def _expand(scales: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Per-block scales [ceil(N / bn), ceil(K / bk)] as one per value [N, K]."""
    rows, cols = shape
    full = scales.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:  # [N, K] float32
    """``weight`` (float8_e4m3fn [N, K]) times its block's scale; a ValueError naming the
    shapes when ``scale_inv`` does not have one scale per block."""
    if weight.dim() != 2:
        raise ValueError(f"an fp8 weight must be 2-d, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight {(rows, cols)} in {block[0]}x{block[1]} blocks needs weight_scale_inv "
            f"{expected}; got {tuple(scale_inv.shape)}"
        )
    return weight.float() * _expand(scale_inv.float(), weight.shape, block)


def quantize_to_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:  # (float8_e4m3fn [N, K], float32 scale_inv)
    """Each block scaled so its largest magnitude is FP8_MAX, rounded to e4m3 (as
    DeepSeek's checkpoints and vLLM's requantization do); the scales to undo it."""
    w = weight.float()
    rows, cols = w.shape
    br, bc = block
    pad_rows, pad_cols = -rows % br, -cols % bc
    padded = torch.nn.functional.pad(w, (0, pad_cols, 0, pad_rows))
    blocks = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    amax = blocks.abs().amax(dim=(1, 3))  # [rows / br, cols / bc]
    scale = amax.clamp(min=1e-12) / FP8_MAX
    q = (w / _expand(scale, w.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def round_to_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight`` (float32) quantized to e4m3 with per-block scales and dequantized: the
    nearest matrix on the fp8 block grid (what a requantized matrix computes with)."""
    q, scale = quantize_to_fp8_blocks(weight, block)
    return dequantize_fp8_blocks(q, scale, block)


def merge_fp8(
    pairs: Iterable[tuple[str, torch.Tensor]],
    config: Fp8Config,
    dtype: torch.dtype,
    source: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each fp8 layer's (weight, weight_scale_inv) as one dequantized ``.weight`` in
    ``dtype``, whatever order or file they come in; other tensors pass through,
    floating ones in ``dtype``. A weight without its scales (or scales without their
    weight) is a ModelLoadError naming the layer."""
    weights: dict[str, torch.Tensor] = {}  # fp8 weights waiting for their scales, by layer
    scales: dict[str, torch.Tensor] = {}  # and scales waiting for their weights
    for name, tensor in pairs:
        prefix, _, part = name.rpartition(".")
        if part == _SCALE:
            scales[prefix] = tensor
        elif part == "weight" and tensor.dtype == torch.float8_e4m3fn:
            weights[prefix] = tensor
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ModelLoadError(
                f"model {source!r}: fp8 tensor {name!r} ({tensor.dtype}) is not a layer's "
                "e4m3 weight; kvrun dequantizes float8_e4m3fn '.weight' tensors with their "
                "'.weight_scale_inv'"
            )
        else:
            yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)
            continue
        if prefix in weights and prefix in scales:
            weight, scale_inv = weights.pop(prefix), scales.pop(prefix)
            try:
                full = dequantize_fp8_blocks(weight, scale_inv, config.block)
            except ValueError as exc:
                raise ModelLoadError(f"model {source!r}: fp8 layer {prefix}: {exc}") from exc
            yield f"{prefix}.weight", full.to(dtype)
    for pending, missing in ((weights, _SCALE), (scales, "fp8 weight")):
        if pending:
            prefix = next(iter(pending))
            raise ModelLoadError(
                f"model {source!r}: fp8 layer {prefix} has no {missing} "
                f"({len(pending)} layer(s) incomplete); the checkpoint is damaged"
            )
