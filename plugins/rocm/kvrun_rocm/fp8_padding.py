"""VLLM_ROCM_FP8_PADDING: space fp8 weight rows 256 bytes further apart.

On AMD GPUs, GEMMs over fp8 weights whose row pitch is a multiple of 512 bytes hit
memory-channel conflicts; giving each row 256 extra bytes of storage moves
consecutive rows onto different channels. The values and the shape are unchanged:
the result is a strided view into the larger storage. kvrun loads no fp8 weights
yet, so nothing calls this during loading; it is ready for the fp8 loader.
"""

from __future__ import annotations

import torch

__all__ = ["PAD_BYTES", "pad_fp8_weight"]

PAD_BYTES = 256
# Row pitches that are a multiple of this many bytes are the ones that conflict.
_CONFLICT_PITCH = 512


def pad_fp8_weight(weight: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``weight`` (any dtype, 2-d or more) with PAD_BYTES more per row where it helps.

    Returned unchanged when disabled, when rows are not contiguous in their last
    dimension, or when the row pitch is not a multiple of 512 bytes.
    """
    if not enabled or weight.dim() < 2 or weight.stride(-1) != 1:
        return weight
    elem = weight.element_size()
    if (weight.stride(-2) * elem) % _CONFLICT_PITCH:
        return weight
    cols = weight.shape[-1]
    storage = torch.zeros(
        (*weight.shape[:-1], cols + PAD_BYTES // elem), dtype=weight.dtype, device=weight.device
    )
    storage[..., :cols].copy_(weight)
    return storage[..., :cols]
