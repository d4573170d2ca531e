"""Quantized weights kept as stored: vLLM's ``quantization=`` names and GGUF matrices.

``quantization`` (:data:`QUANTIZATION_METHODS`) says how a quantized checkpoint runs:

- ``None`` (the default): as its format says, dequantized at load (GGUF and AWQ alike:
  the model then computes in its float dtype, and greedy output equals transformers'
  on the same file). vLLM reads an AWQ checkpoint's ``quantization_config`` and runs its
  AWQ kernels; kvrun keeps ``None`` exact, as for GGUF, and runs the weights as stored
  only when asked;
- ``"gguf"``: a GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices stay in their blocks
  (:class:`QuantizedMatrix`) and run on the platform's quantized kernels
  (``Platform.quantized_gguf_types``); other tensor types are dequantized at load;
- ``"awq"``: an AWQ checkpoint's 4-bit projections stay packed (:class:`QuantizedMatrix`
  of type ``AWQ_G<group_size>``, :func:`awq_qtype`) and run on the platform's kernels
  (``Platform.quantized_awq``), for the dense Llama-family models on one device; groups
  that are not whole blocks of 32 columns, other models and other platforms are
  dequantized at load, with a log line saying so;
- ``"fp8"``: an fp8 block-quantized checkpoint (DeepSeek-V3's form, kvrun.loader.fp8),
  dequantized at load (as ``None``); vLLM's online fp8 quantization of a float
  checkpoint is not built and is refused.
vLLM's GPU-only kernels (``awq_marlin``, ``gptq_marlin``, ...) are refused with the
reason.

A :class:`QuantizedMatrix` is what the loader yields and the model holds until the
platform's ``prepare_linear`` repacks it; the reference ``linear`` and ``embedding``
ops dequantize it per call (the oracle the platform's kernels are tested against).
Its rows are GGUF blocks, or AWQ's values regrouped by output row (:func:`awq_qtype`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from kvrun.errors import ConfigError

__all__ = [
    "EXECUTABLE_GGUF_TYPES",
    "GPU_ONLY_METHODS",
    "QUANTIZATION_METHODS",
    "QuantizedMatrix",
    "awq_qtype",
    "check_quantization",
    "quantized_block",
    "quantized_names",
]

# The accepted values of ``quantization`` (None: dequantize at load).
QUANTIZATION_METHODS = ("gguf", "awq", "fp8")
# vLLM's names for GPU kernels kvrun has no counterpart of, with what to use instead.
GPU_ONLY_METHODS = (
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "gptq_marlin_24",
    "marlin",
    "fbgemm_fp8",
    "modelopt",
    "bitsandbytes",
    "compressed-tensors",
    "experts_int8",
    "ipex",
    "torchao",
)
# GGUF types a matrix may stay in (block of 32 values, bytes per block).
EXECUTABLE_GGUF_TYPES: Mapping[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),  # super-blocks of 8 x 32 values: 6-bit scales and mins
    "Q6_K": (256, 210),  # super-blocks of 16 x 16 values: 6-bit values, int8 scales
}


_AWQ_PREFIX = "AWQ_G"


def awq_qtype(group_size: int) -> str:
    """The :class:`QuantizedMatrix` type of AWQ 4-bit rows in groups of ``group_size``
    columns (a multiple of 32): each group one block of ``group_size / 2 + 3`` bytes, the
    fp16 scale, the uint8 zero point, then the values' nibbles, 16 bytes per 32 columns
    with column c in the low nibble of byte c and c + 16 in its high one (GGUF's Q4
    order). A value q of the group dequantizes to ``scale * (q - zero)``, AWQ's rule."""
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"AWQ groups of {group_size} columns are not whole blocks of 32")
    return f"{_AWQ_PREFIX}{group_size}"


def quantized_block(qtype: str) -> tuple[int, int] | None:
    """(columns, bytes) of one block of ``qtype``; None if no such type is kept quantized."""
    if qtype in EXECUTABLE_GGUF_TYPES:
        return EXECUTABLE_GGUF_TYPES[qtype]
    group = qtype.removeprefix(_AWQ_PREFIX)
    if qtype.startswith(_AWQ_PREFIX) and group.isdigit() and int(group) % 32 == 0 < int(group):
        return int(group), int(group) // 2 + 3
    return None


def check_quantization(method: str | None) -> None:
    """A ConfigError naming ``method`` unless kvrun accepts it."""
    if method is None or method in QUANTIZATION_METHODS:
        return
    if method in GPU_ONLY_METHODS:
        raise ConfigError(
            f"quantization {method!r} names one of vLLM's GPU kernels, which kvrun does not "
            f"have; accepted: {', '.join(QUANTIZATION_METHODS)}, or omit it (a quantized "
            "checkpoint is then dequantized at load)"
        )
    raise ConfigError(
        f"quantization {method!r} is not known; accepted: {', '.join(QUANTIZATION_METHODS)}, "
        "or omit it (a quantized checkpoint is then dequantized at load)"
    )


class QuantizedMatrix:
    """An [out_features, in_features] matrix in GGUF blocks, as the file stores it, or
    in AWQ groups (:func:`awq_qtype`).

    ``blocks`` is uint8 [out_features, in_features / block * block_bytes]: row r's blocks
    of consecutive columns, each laid out as ``qtype`` says. Rows are
    independent, so a model may merge matrices along the rows (q|k|v) by filling row
    slices (:meth:`__getitem__` with a slice is a view) with :meth:`copy_`. ``dtype`` is
    the float dtype the model computes in: what :meth:`dequantize` returns.
    """

    def __init__(
        self,
        qtype: str,
        blocks: torch.Tensor,
        in_features: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        geometry = quantized_block(qtype)
        if geometry is None:
            raise ValueError(
                f"GGUF type {qtype} is not kept quantized; accepted: "
                f"{', '.join(EXECUTABLE_GGUF_TYPES)} (and AWQ_G<n>, n a multiple of 32)"
            )
        block, nbytes = geometry
        if in_features % block or blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(
                f"a {qtype} matrix needs uint8 rows of whole {block}-column blocks; got "
                f"{blocks.dtype} {tuple(blocks.shape)} for {in_features} columns"
            )
        if blocks.shape[1] != in_features // block * nbytes:
            raise ValueError(
                f"{in_features} columns of {qtype} take {in_features // block * nbytes} bytes "
                f"per row, not {blocks.shape[1]}"
            )
        self.qtype = qtype
        self.blocks = blocks
        self.in_features = in_features
        self.dtype = dtype

    @classmethod
    def empty(
        cls, qtype: str, out_features: int, in_features: int, dtype: torch.dtype = torch.float32
    ) -> QuantizedMatrix:
        geometry = quantized_block(qtype)
        assert geometry is not None, qtype
        block, nbytes = geometry
        rows = torch.empty((out_features, -(-in_features // block) * nbytes), dtype=torch.uint8)
        return cls(qtype, rows, in_features, dtype)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.numel())

    def __getitem__(self, rows: slice) -> QuantizedMatrix:
        """Rows ``rows`` (a slice) as a view: filling it fills this matrix."""
        if not isinstance(rows, slice):
            raise TypeError(f"a QuantizedMatrix is indexed by a slice of rows, not {rows!r}")
        return QuantizedMatrix(self.qtype, self.blocks[rows], self.in_features, self.dtype)

    def copy_(self, other: Any) -> QuantizedMatrix:
        """Fill with ``other``'s blocks (a QuantizedMatrix of the same type and shape)."""
        if not isinstance(other, QuantizedMatrix) or other.qtype != self.qtype:
            got = other.qtype if isinstance(other, QuantizedMatrix) else type(other).__name__
            raise TypeError(f"a {self.qtype} matrix is filled from {self.qtype} blocks, not {got}")
        self.blocks.copy_(other.blocks)
        return self

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The matrix (or its rows ``rows``, [T] int64) in ``dtype``, as the loader
        dequantizes it (``gguf.quants.dequantize``, or AWQ's ``scale * (q - zero)``, in
        float32, then converted)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        blocks = self.blocks if rows is None else self.blocks.index_select(0, rows)
        if self.qtype.startswith(_AWQ_PREFIX):
            return _awq_dequantize_rows(blocks, self.in_features).to(self.dtype)
        values = dequantize(blocks.numpy(), GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.dtype)

    def __repr__(self) -> str:
        return f"QuantizedMatrix({self.qtype}, {self.out_features}x{self.in_features})"


def _awq_dequantize_rows(blocks: torch.Tensor, in_features: int) -> torch.Tensor:
    """AWQ rows (:func:`awq_qtype`) [N, groups * (group / 2 + 3)] -> float32 [N, K]."""
    n = blocks.shape[0]
    # groups * (group / 2 + 3) bytes for groups * group columns
    num_groups = (blocks.shape[1] - in_features // 2) // 3
    raw = blocks.reshape(n, num_groups, -1)
    scale = raw[..., 0:2].contiguous().view(torch.float16).float()  # [N, G, 1]
    zero = raw[..., 2:3].to(torch.int32)
    nib = raw[..., 3:].reshape(n, num_groups, -1, 16).to(torch.int32)  # per 32 columns
    q = torch.cat([nib & 0x0F, nib >> 4], dim=-1).reshape(n, num_groups, -1)
    return ((q - zero).float() * scale).reshape(n, in_features)


def awq_rows(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> QuantizedMatrix:
    """One AWQ layer's (qweight [K, N / 8], qzeros [K / group, N / 8], fp16 scales
    [K / group, N]; shapes checked) as a ``dtype`` :class:`QuantizedMatrix` of
    :func:`awq_qtype` rows: the same values, scales and zero points, one output row
    after another. ``group_size`` must divide K into whole blocks of 32 (-1: all of K)."""
    from kvrun.ops.reference import unpack_awq

    k = qweight.shape[0]
    group = k if group_size == -1 else group_size
    qtype = awq_qtype(group)
    if k % group:
        raise ValueError(f"{k} input rows are not whole AWQ groups of {group}")
    q = unpack_awq(qweight).to(torch.uint8).t()  # [N, K]
    n = q.shape[0]
    z = unpack_awq(qzeros).to(torch.uint8).t()  # [N, G]
    s = scales.to(torch.float16).t().reshape(-1)  # [N * G], row after row
    halves = q.reshape(n, k // 32, 2, 16)
    nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // group, group // 2)
    head = torch.cat([s.view(torch.uint8).reshape(n, -1, 2), z.reshape(n, -1, 1)], dim=-1)
    blocks = torch.cat([head, nibbles], dim=-1).reshape(n, -1)
    return QuantizedMatrix(qtype, blocks, k, dtype)


def quantized_names(
    groups: Iterable[tuple[str, ...]],
    stored_types: Mapping[str, str],
    accepted: Iterable[str],
) -> dict[tuple[str, ...], str]:
    """Which of a model's matrices stay quantized: each group of Hugging Face names
    (the parts of one merged matrix, e.g. q/k/v) whose parts are all stored in one
    ``accepted`` GGUF type, with that type. A group with a part missing from
    ``stored_types`` (another spelling of a merged weight) or of another type is left
    out: it is dequantized at load."""
    allowed = {qtype for qtype in accepted if quantized_block(qtype) is not None}
    kept: dict[tuple[str, ...], str] = {}
    for group in groups:
        types = {stored_types.get(name) for name in group}
        if len(types) == 1:
            (qtype,) = types
            if qtype in allowed:
                assert qtype is not None
                kept[group] = qtype
    return kept


def keep_llama_quantized(
    model: Any, stored_types: Mapping[str, str], accepted: Iterable[str]
) -> frozenset[str]:
    """Before loading: replace a Llama-family model's matrices (merged q|k|v, o, gate|up,
    down, the embedding and the lm_head) stored in one ``accepted`` GGUF type by empty
    :class:`QuantizedMatrix` destinations; returns the Hugging Face names the loader
    must then yield quantized. Mixture layers and the rest keep their float tensors."""
    names: set[str] = set()

    def swap(owner: Any, attr: str, groups: list[tuple[str, ...]]) -> None:
        current = getattr(owner, attr)
        kept = quantized_names(groups, stored_types, accepted)
        if not isinstance(current, torch.Tensor) or not kept:
            return
        group, qtype = next(iter(kept.items()))
        out_features, in_features = current.shape
        geometry = quantized_block(qtype)
        if geometry is None or in_features % geometry[0]:
            return  # not whole blocks (no GGUF writer makes such a row): dequantized
        setattr(owner, attr, QuantizedMatrix.empty(qtype, out_features, in_features, model.dtype))
        names.update(group)

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv = (tuple(f"{attn}{x}_proj.weight" for x in "qkv"), (attn + "qkv_proj.weight",))
        swap(layer, "qkv", list(qkv))
        swap(layer, "o", [(attn + "o_proj.weight",)])
        if layer.gate_up is not None:
            gate_up = (mlp + "gate_proj.weight", mlp + "up_proj.weight")
            swap(layer, "gate_up", [gate_up, (mlp + "gate_up_proj.weight",)])
            swap(layer, "down", [(mlp + "down_proj.weight",)])
    tied = model.lm_head is model.embed
    if model.embed is not None:
        swap(model, "embed", [("model.embed_tokens.weight",)])
    if tied:
        model.lm_head = model.embed
    elif model.lm_head is not None:
        swap(model, "lm_head", [("lm_head.weight",)])
    return frozenset(names)


def _plan_awq(checkpoint: Any, model: Any, platform: Any, logger: Any) -> frozenset[str]:
    """``quantization="awq"`` on an AWQ checkpoint: the layers kept packed (see
    :func:`plan_quantized_load`), each other one dequantized at load with the reason
    logged."""
    from kvrun.loader.awq import awq_config, awq_stored_types

    config = awq_config(checkpoint.hf_config, checkpoint.source)
    assert config is not None
    keep = getattr(model, "keep_quantized", None)
    why = None
    if not getattr(platform, "quantized_awq", False):
        why = f"the {platform.name} platform has no AWQ kernels"
    elif keep is None or getattr(model, "parallel", None) is not None:
        what = type(model).__name__ + (" in parallel" if keep is not None else "")
        why = f"AWQ runs as stored in the Llama-family dense models on one device, not {what}"
    elif checkpoint.format != "safetensors":
        why = f"AWQ runs as stored from safetensors files, not {checkpoint.format}"
    if why is not None:
        logger.info("quantization='awq': %s; the AWQ weights are dequantized at load", why)
        return frozenset()
    assert keep is not None
    stored = awq_stored_types(checkpoint.weight_files, config)
    names = frozenset(keep(stored, frozenset(stored.values())))
    left = len(stored) - len(names)
    logger.info(
        "quantization='awq': %d AWQ matrices run as stored (group size %s)%s",
        len(names),
        config.group_size,
        f"; {left} dequantized at load (groups not whole blocks of 32 input rows, or q|k|v "
        "and gate|up groups that differ)"
        if left
        else "",
    )
    return names


def plan_quantized_load(
    method: str | None, checkpoint: Any, model: Any, platform: Any
) -> frozenset[str]:
    """What ``quantization=method`` means for this checkpoint, model and platform: the
    Hugging Face names the loader yields as :class:`QuantizedMatrix` (the model's
    destinations for them already swapped, :func:`keep_llama_quantized`); empty where
    everything is dequantized at load. A ConfigError where the method does not apply."""
    import logging

    logger = logging.getLogger("kvrun.engine")
    check_quantization(method)
    if method is None:
        return frozenset()
    if method == "awq":
        from kvrun.loader.awq import awq_config

        if (
            checkpoint.format == "gguf"
            or awq_config(checkpoint.hf_config, checkpoint.source) is None
        ):
            raise ConfigError(
                f"quantization='awq' but {checkpoint.source!r} is not an AWQ checkpoint "
                "(config.json's quantization_config has no quant_method 'awq'); omit it"
            )
        return _plan_awq(checkpoint, model, platform, logger)
    if method == "fp8":
        from kvrun.loader.fp8 import fp8_config

        if (
            checkpoint.format == "gguf"
            or fp8_config(checkpoint.hf_config, checkpoint.source) is None
        ):
            raise ConfigError(
                f"quantization='fp8' but {checkpoint.source!r} has no fp8 weights (config.json's "
                "quantization_config has no quant_method 'fp8'); vLLM would quantize it to fp8 "
                "at load, which kvrun does not do: omit quantization"
            )
        logger.info("quantization='fp8': the fp8 weights are dequantized at load")
        return frozenset()
    if checkpoint.format != "gguf":
        raise ConfigError(
            f"quantization='gguf' needs a GGUF file; {checkpoint.source!r} is a "
            f"{checkpoint.format} checkpoint (omit quantization)"
        )
    accepted = frozenset(getattr(platform, "quantized_gguf_types", frozenset()))
    keep = getattr(model, "keep_quantized", None)
    if not accepted:
        raise ConfigError(
            f"quantization='gguf': the {platform.name} platform has no kernels for GGUF "
            "blocks; omit quantization to dequantize the file at load"
        )
    if keep is None or getattr(model, "parallel", None) is not None:
        raise ConfigError(
            f"quantization='gguf' runs the Llama-family dense models on one device, not "
            f"{type(model).__name__}{' in parallel' if keep else ''}; omit quantization to "
            "dequantize the file at load"
        )
    from kvrun.loader.gguf_loader import gguf_stored_types, open_gguf

    reader = checkpoint.gguf_reader or open_gguf(checkpoint.gguf_file)
    stored = gguf_stored_types(reader, checkpoint.hf_config, checkpoint.gguf_file)
    names = frozenset(keep(stored, accepted))
    matrices = {n: t for n, t in stored.items() if n.endswith(".weight") and "norm" not in n}
    left = sorted({t for n, t in matrices.items() if n not in names})
    counts = sorted({t for n, t in matrices.items() if n in names})
    logger.info(
        "quantization='gguf': %d of %d weight matrices run as stored (%s); %s",
        len(names),
        len(matrices),
        ", ".join(counts) or "none",
        f"the rest ({', '.join(left)}) dequantized at load" if left else "none dequantized",
    )
    return names
