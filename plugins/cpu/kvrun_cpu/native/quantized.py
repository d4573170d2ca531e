"""GGUF and AWQ matrices run as stored (``quantization="gguf"`` / ``"awq"``): the
repacking, once at load, and the calls into ``csrc/quant.c``.

:func:`pack_quantized` turns a :class:`kvrun.quantization.QuantizedMatrix` (GGUF Q8_0,
Q4_0, Q4_1, Q4_K or Q6_K blocks, row by row) into :class:`QuantizedPackedWeight`: panels of
16 rows, each block of 32 columns as the kernel's AVX512-VNNI operands plus 16 scales
and 16 offsets (the layout is described in ``csrc/quant.c``). Its size is about the
file's: Q4_1 exactly, Q4_0 and Q8_0 one fp16 offset per block of 32 more, Q4_K 6.0 bits
per value instead of 4.5 (each sub-block's scale and min as fp32, since d times a 6-bit
scale needs 17 bits), Q6_K 8.0 instead of 6.56 (its 6-bit values whole, d times each
16-value sub-block's int8 scale as fp32). Activations are quantized
per token to int8 blocks of 32 inside the kernel, as llama.cpp does, so results are
within the format's rounding of dequantize-then-matmul, not equal to it
(``plugins/cpu/tests/test_cpu_quantized_linear.py`` states the tolerance).

AWQ rows (:func:`kvrun.quantization.awq_qtype`, group g) repack to panels of 16 rows
whose groups are g / 32 blocks of nibble lines and one line of the rows' fp16 scales and
uint8 zero points: 4.25 bits per value at g = 128 against the checkpoint's 4.16, 4.5 at
64, 5.0 at 32 (``plugins/cpu/tests/test_cpu_awq_linear.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvrun.quantization import EXECUTABLE_GGUF_TYPES, QuantizedMatrix, quantized_block

__all__ = [
    "QUANTIZED_TYPES",
    "QuantizedPackedWeight",
    "pack_quantized",
    "quantized_isa",
    "quantized_linear",
    "quantized_rows",
]

logger = logging.getLogger("kvrun.cpu")

PANEL = 16  # output rows per panel (csrc/quant.c)
QBLOCK = 32  # input columns per block
# GGUF type -> bits per stored value in the kernel's layout
# (36: 4-bit values with fp32 scales, csrc/quant.c's QF32)
_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q4_K": 36, "Q6_K": 6}
QUANTIZED_TYPES = frozenset(_BITS)
assert QUANTIZED_TYPES <= set(EXECUTABLE_GGUF_TYPES)
_AWQ_FORMAT = 1000  # csrc/quant.c's QAWQ: + blocks of 32 per group
_LOGGED: set[str] = set()  # libraries whose quantized path was logged


@dataclass(frozen=True, eq=False)
class QuantizedPackedWeight:
    """An [out_features, in_features] GGUF matrix in ``csrc/quant.c``'s layout.

    ``blocks`` is uint8 [ceil(out / 16), in / 32, block bytes] (AWQ: [ceil(out / 16),
    bytes per panel]), 64-byte aligned; rows past
    ``out_features`` are zero. ``dtype`` is the model's float dtype (of what ``linear``
    returns). What the cpu plugin's ``prepare_linear`` returns for a QuantizedMatrix and
    its ``linear`` and ``embedding`` read.
    """

    blocks: torch.Tensor
    qtype: str
    out_features: int
    in_features: int
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        """The format code csrc/quant.c dispatches on."""
        if self.qtype in _BITS:
            return _BITS[self.qtype]
        return _AWQ_FORMAT + _awq_group(self.qtype) // QBLOCK

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.numel())


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [N, K / 256, 144] -> the nibble bytes of each block of 32 in
    Q4_0's order [N, K / 32, 16] and its fp32 scale and offset [N, K / 32]: value d *
    sc * q - dmin * m, sc and m the sub-block's 6-bit scale and min."""
    from gguf.quants import Q4_K

    n, supers = raw.shape[:2]
    d = np.ascontiguousarray(raw[..., 0:2]).view(np.float16).astype(np.float32)  # [N, S, 1]
    dmin = np.ascontiguousarray(raw[..., 2:4]).view(np.float16).astype(np.float32)
    sc, mins = Q4_K.get_scale_min(np.ascontiguousarray(raw[..., 4:16]).reshape(-1, 12))
    scale = (d * sc.reshape(n, supers, 8).astype(np.float32)).reshape(n, supers * 8)
    offset = -(dmin * mins.reshape(n, supers, 8).astype(np.float32)).reshape(n, supers * 8)
    qs = raw[..., 16:144].reshape(n, supers, 4, 1, 32)
    # 64 values per 32 bytes: the low nibbles are the first sub-block, the high the next
    values = ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F).reshape(
        n, supers * 8, 32
    )
    nibbles = values[..., :16] | (values[..., 16:] << 4)
    return nibbles, scale, offset


def _q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K super-blocks [N, K / 256, 210] (128 bytes of low nibbles, 64 of top 2-bit
    pairs, 16 int8 scales, fp16 d) -> each value v in [0, 64) [N, K / 32, 32] and d times
    its sub-block's scale [N, K / 16] (fp32, exact): weight = that (v - 32)."""
    n, supers = raw.shape[:2]
    low = raw[..., 0:128].reshape(n, supers, 2, 64)  # per half of 128 values
    top = raw[..., 128:192].reshape(n, supers, 2, 1, 32)
    # a half's value j: low nibble of byte j % 64 (j < 64) or its high nibble (j >= 64);
    # top bits 2 (j // 32) .. of byte j % 32
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=-1)  # [n, S, 2, 128]
    pairs = (top >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03
    values = nibbles | (pairs.reshape(n, supers, 2, 128) << 4)
    scales = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)
    d = np.ascontiguousarray(raw[..., 208:210]).view(np.float16).astype(np.float32)
    return values.reshape(n, supers * 8, 32), (d * scales).reshape(n, supers * 16)


def _interleave_q6(values: np.ndarray, scale: np.ndarray, panels: int, kb: int) -> np.ndarray:
    """values [N, kb, 32] in [0, 64), scale [N, 2 kb] fp32 -> csrc/quant.c's Q6 blocks:
    4 nibble lines, 2 top-bit lines, then d_lo and d_hi of the block's 16 rows."""
    lines = values.reshape(panels, PANEL, kb, 8, 4).transpose(0, 2, 3, 1, 4)
    lines = lines.reshape(panels, kb, 8, 64)  # line g: columns 4g .. 4g + 3 of each row
    nibbles = (lines[:, :, :4] & 0x0F) | ((lines[:, :, 4:] & 0x0F) << 4)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    pairs = ((lines >> 4) & 0x03).reshape(panels, kb, 2, 4, 64) << shifts
    tops = np.bitwise_or.reduce(pairs, axis=3)  # [P, kb, 2, 64]
    halves = scale.reshape(panels, PANEL, kb, 2).transpose(0, 2, 3, 1)  # [P, kb, 2, 16]
    d = np.ascontiguousarray(halves.astype(np.float32)).view(np.uint8).reshape(panels, kb, 128)
    return np.concatenate(
        [nibbles.reshape(panels, kb, 256), tops.reshape(panels, kb, 128), d], axis=-1
    )


def _awq_group(qtype: str) -> int:
    geometry = quantized_block(qtype)
    if geometry is None or not qtype.startswith("AWQ_G"):
        raise ValueError(
            f"type {qtype} has no native kernel; accepted: {', '.join(sorted(_BITS))} and "
            "AWQ_G<n> (n a multiple of 32)"
        )
    return geometry[0]


def _repack_awq(matrix: QuantizedMatrix) -> np.ndarray:  # uint8 [P, bytes per panel]
    """AWQ rows -> csrc/quant.c's QAWQ panels: per group, its blocks' 4 nibble lines
    (the rows' nibble bytes are already in the kernel's column order), then the 16 rows'
    fp16 scales, uint8 zero points and 16 zero bytes."""
    n, k = matrix.shape
    group = _awq_group(matrix.qtype)
    groups, panels, blocks = k // group, -(-n // PANEL), group // QBLOCK
    raw = np.zeros((panels * PANEL, groups, group // 2 + 3), dtype=np.uint8)
    raw[:n] = matrix.blocks.numpy().reshape(n, groups, -1)
    # nibble byte t of block e of a group (row 16p + l) -> line t // 4, byte 4 l + t % 4
    values = raw[..., 3:].reshape(panels, PANEL, groups, blocks, 4, 4)
    lines = values.transpose(0, 2, 3, 4, 1, 5).reshape(panels, groups, blocks * 256)
    head = raw[..., :3].reshape(panels, PANEL, groups, 3).transpose(0, 2, 3, 1)
    scales = np.ascontiguousarray(head[:, :, :2].transpose(0, 1, 3, 2)).reshape(panels, groups, 32)
    params = np.concatenate(
        [scales, head[:, :, 2], np.zeros((panels, groups, 16), dtype=np.uint8)], axis=-1
    )
    return np.concatenate([lines, params], axis=-1).reshape(panels, -1)


def _repack(matrix: QuantizedMatrix) -> np.ndarray:  # uint8 [P, K / 32, block bytes]
    n, k = matrix.shape
    block, nbytes = EXECUTABLE_GGUF_TYPES[matrix.qtype]
    kb, panels = k // QBLOCK, -(-n // PANEL)
    raw = np.zeros((panels * PANEL, k // block, nbytes), dtype=np.uint8)
    raw[:n] = matrix.blocks.numpy().reshape(n, k // block, nbytes)
    if matrix.qtype == "Q4_K":
        values, d, offset = _q4_k(raw)
        return _interleave(values, d, offset, panels, kb)
    if matrix.qtype == "Q6_K":
        q6, scale = _q6_k(raw)
        return _interleave_q6(q6, scale, panels, kb)
    d = np.ascontiguousarray(raw[..., 0:2]).view(np.float16)[..., 0]  # [N, kb]
    if matrix.qtype == "Q4_1":
        offset = np.ascontiguousarray(raw[..., 2:4]).view(np.float16)[..., 0]
        values = raw[..., 4:20]
    elif matrix.qtype == "Q4_0":
        offset = (d.astype(np.float32) * -8.0).astype(np.float16)  # exact: a power of two
        values = raw[..., 2:18]
    else:  # Q8_0: int8 values made unsigned (+128), the offset takes the 128 back
        offset = (d.astype(np.float32) * -128.0).astype(np.float16)
        values = raw[..., 2:34] ^ np.uint8(0x80)
    finite = np.isfinite(d.astype(np.float32))  # fp16 [N, kb]
    if not np.isfinite(offset.astype(np.float32))[finite].all():
        raise ValueError(
            f"a {matrix.qtype} block scale is too large for its offset in fp16 (|d| > "
            f"{65504 / (8 if matrix.qtype == 'Q4_0' else 128):g}); load it dequantized"
        )
    return _interleave(values, d, offset, panels, kb)


def _interleave(
    values: np.ndarray, d: np.ndarray, offset: np.ndarray, panels: int, kb: int
) -> np.ndarray:
    """values [N, kb, 16 or 32] bytes, d and offset [N, kb] (fp16 or fp32; padding rows
    zero, so they add nothing) -> the kernel's blocks [P, kb, block bytes]."""
    groups = values.shape[-1] // 4  # lines of 64 bytes per block: 4 (4-bit) or 8
    # value byte (row 16p + l, block b, 4g + t) -> [p, b, g, l, t]
    data = values.reshape(panels, PANEL, kb, groups, 4).transpose(0, 2, 3, 1, 4)
    data = data.reshape(panels, kb, groups * 64)

    def lanes(scale: np.ndarray) -> np.ndarray:  # [N, kb] -> [P, kb, 16 x its size] bytes
        per_panel = scale.reshape(panels, PANEL, kb).transpose(0, 2, 1)
        return np.ascontiguousarray(per_panel).view(np.uint8)

    return np.concatenate([data, lanes(d), lanes(offset)], axis=-1)


def pack_quantized(matrix: QuantizedMatrix) -> QuantizedPackedWeight:
    """The matrix in the kernel's layout (a new, 64-byte aligned tensor)."""
    repacked = _repack(matrix) if matrix.qtype in _BITS else _repack_awq(matrix)
    blocks = torch.empty(repacked.shape, dtype=torch.uint8)
    assert blocks.data_ptr() % 64 == 0  # the kernel loads whole aligned lines
    blocks.numpy()[...] = repacked
    n, k = matrix.shape
    return QuantizedPackedWeight(blocks, matrix.qtype, n, k, matrix.dtype)


def quantized_isa(native: Any) -> str:
    """Which code runs the quantized matmuls of this library, for the log."""
    return "AVX512-VNNI" if native._quant_isa() else "portable C"


def _log_path(native: Any) -> None:
    key = str(native.library)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("quantized GGUF/AWQ matmuls (native %s): %s", native.isa, quantized_isa(native))


def quantized_linear(
    native: Any,
    x: torch.Tensor,  # [M, K] float32 or bfloat16
    weight: QuantizedPackedWeight,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """x @ weight.T + bias with x quantized per token and block of 32 (csrc/quant.c);
    float32 sums, rounded to x's dtype at the end."""
    _log_path(native)
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x has {k} columns; the {weight.qtype} matrix takes {weight.in_features}")
    xf = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.float().contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if b is not None:
        assert b.shape == (n,)
    y = torch.empty((m, n), dtype=torch.float32)
    failed = native._quant_linear(
        xf.data_ptr(),
        xf.stride(0),
        weight.blocks.data_ptr(),
        weight.bits,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        n,
        m,
        n,
        k,
        native.threads,
    )
    if failed:
        raise MemoryError(f"no memory for the int8 copy of a [{m}, {k}] activation")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def quantized_rows(native: Any, ids: torch.Tensor, weight: QuantizedPackedWeight) -> torch.Tensor:
    """Rows ``ids`` ([T] int64) of the matrix, dequantized exactly as the GGUF loader
    does, in the weight's dtype; an id outside it is an IndexError."""
    ids = ids.contiguous()
    assert ids.dtype == torch.int64 and ids.dim() == 1
    out = torch.empty((ids.shape[0], weight.in_features), dtype=torch.float32)
    bad = native._quant_rows(
        ids.data_ptr(),
        ids.shape[0],
        weight.blocks.data_ptr(),
        weight.bits,
        weight.out_features,
        weight.in_features,
        out.data_ptr(),
    )
    if bad >= 0:
        raise IndexError(f"index {int(ids[bad])} is out of range for {weight.out_features} rows")
    return out if weight.dtype == torch.float32 else out.to(weight.dtype)
