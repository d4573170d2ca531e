"""Shape buckets: Gaudi compiles one graph per input shape, so shapes are padded to a few sizes.

Pure integer arithmetic, no device: the decode batch size and the decode block count are
each padded up to the next bucket, so a run meets a bounded set of graph shapes that
warm-up can compile in advance.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from kvrun.errors import ConfigError

__all__ = ["BucketRange", "pad_to_bucket"]


@dataclass(frozen=True)
class BucketRange:
    """Buckets ``min, 2*min, 4*min, ...`` below ``step``, then steps of ``step`` up to ``max``.

    Doubling keeps small shapes cheap to pad; the linear part bounds the padding of large
    shapes to less than ``step``.
    """

    min: int  # smallest bucket
    step: int  # the linear stride once buckets reach it
    max: int  # largest warmed-up bucket; larger sizes round up to a multiple of step

    def __post_init__(self) -> None:
        for name in ("min", "step", "max"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"bucket {name}={value!r} is not accepted; it must be a positive integer"
                )
        if not self.min <= self.max:
            raise ConfigError(f"bucket min={self.min} exceeds max={self.max}; need min <= max")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every bucket in ascending order: the shapes warm-up compiles."""
        out: list[int] = []
        size = self.min
        while size < min(self.step, self.max):
            out.append(size)
            size *= 2
        # The first multiple of step above the doubled ones; min itself when none doubled.
        size = (out[-1] // self.step + 1) * self.step if out else self.min
        while size < self.max:
            out.append(size)
            size += self.step
        out.append(self.max)
        return tuple(sorted(set(out)))


def pad_to_bucket(n: int, buckets: BucketRange) -> int:
    """The smallest bucket >= n; past ``max``, n rounded up to a multiple of ``step``."""
    assert n >= 0, n
    sizes = buckets.sizes
    i = bisect.bisect_left(sizes, n)
    if i < len(sizes):
        return sizes[i]
    # Beyond the warmed-up range: a new graph compiles, but padding stays below step.
    return -(-n // buckets.step) * buckets.step
