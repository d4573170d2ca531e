"""Weights in the native kernels' panel layout (``csrc/packed.c``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PANEL", "PackedWeight"]

PANEL = 16  # output rows per panel


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A [out_features, in_features] matrix as panels of 16 output rows.

    float32: ``panels[p, c, l]`` is row ``16 p + l``, column ``c``. bfloat16: columns go
    in pairs, ``panels[p, c // 2, l, c % 2]`` (the operand of AVX512-BF16's dot product).
    Rows past ``out_features`` and the column padding the pairs need are zero. What the
    cpu plugin's ``prepare_linear`` returns and its ``linear`` and ``embedding`` read;
    nothing else should read it as a matrix.
    """

    # float32 [ceil(out / 16), in, 16] or bfloat16 [ceil(out / 16), ceil(in / 2), 16, 2]
    panels: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.panels.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def unpack(self) -> torch.Tensor:  # [out_features, in_features]
        """The plain matrix (a copy), for callers outside the native kernels."""
        if self.panels.dim() == 3:
            rows = self.panels.permute(0, 2, 1).reshape(-1, self.in_features)
        else:  # pairs: [P, K/2, 16, 2] -> [P, 16, K/2, 2]
            rows = self.panels.permute(0, 2, 1, 3).reshape(-1, 2 * self.panels.shape[1])
        return rows[: self.out_features, : self.in_features].contiguous()
