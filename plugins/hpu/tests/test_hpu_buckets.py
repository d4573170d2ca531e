"""Shape buckets: the exact sizes warm-up compiles and the padding of each size."""

from __future__ import annotations

import pytest

from kvrun.errors import ConfigError
from kvrun_hpu.buckets import BucketRange, pad_to_bucket


@pytest.mark.parametrize(
    ("buckets", "sizes"),
    [
        (BucketRange(1, 32, 256), (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)),
        (BucketRange(128, 128, 512), (128, 256, 384, 512)),
        (BucketRange(2, 4, 12), (2, 4, 8, 12)),
        (BucketRange(3, 8, 20), (3, 6, 8, 16, 20)),
        (BucketRange(2, 4, 3), (2, 3)),
        (BucketRange(5, 5, 5), (5,)),
        (BucketRange(6, 4, 20), (6, 10, 14, 18, 20)),
    ],
)
def test_sizes_double_then_step(buckets: BucketRange, sizes: tuple[int, ...]) -> None:
    assert buckets.sizes == sizes


@pytest.mark.parametrize(
    ("n", "padded"), [(0, 2), (1, 2), (2, 2), (3, 4), (5, 8), (9, 12), (12, 12), (13, 16), (17, 20)]
)
def test_pad_to_bucket(n: int, padded: int) -> None:
    assert pad_to_bucket(n, BucketRange(2, 4, 12)) == padded


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, 8), "bucket min=0 is not accepted; it must be a positive integer"),
        ((1, -4, 8), "bucket step=-4 is not accepted; it must be a positive integer"),
        ((16, 4, 8), "bucket min=16 exceeds max=8; need min <= max"),
    ],
)
def test_bad_ranges_say_what_is_accepted(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        BucketRange(*args)
    assert str(info.value) == message
