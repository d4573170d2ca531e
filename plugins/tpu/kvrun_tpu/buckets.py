"""Shape buckets: the padded sizes a step is compiled for.

XLA compiles one graph per distinct input shape. Padding the token count and the
number of requests of every step up to a power of two bounds the graphs to
``len(token_buckets) * len(seq_buckets)`` (fewer: a step never has more requests
than tokens), whatever lengths the requests have. Block tables are padded to the
blocks of one ``max_model_len`` sequence, so they add no shapes at all.

Pure arithmetic, no torch: the scheduler-facing sizes are tested without torch_xla.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.errors import ConfigError

__all__ = ["MIN_TOKEN_BUCKET", "BucketSpec", "next_bucket", "power_of_two_buckets"]

# Below 16 tokens a step is latency-bound anyway; one small graph covers all of them.
MIN_TOKEN_BUCKET = 16


def power_of_two_buckets(minimum: int, maximum: int) -> tuple[int, ...]:
    """``minimum, 2 * minimum, ...`` up to the first power-of-two multiple >= ``maximum``."""
    assert 1 <= minimum, f"minimum bucket {minimum} must be >= 1"
    buckets = [minimum]
    while buckets[-1] < maximum:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def next_bucket(n: int, buckets: tuple[int, ...], what: str) -> int:
    """The smallest bucket that holds ``n``; a ConfigError names ``what`` when none does."""
    for b in buckets:
        if n <= b:
            return b
    raise ConfigError(
        f"{what}={n} exceeds the largest compiled bucket {buckets[-1]}; "
        f"buckets are {', '.join(map(str, buckets))}"
    )


@dataclass(frozen=True)
class BucketSpec:
    """The padded shapes one engine compiles, from its scheduler limits."""

    max_num_batched_tokens: int  # tokens per step at most
    max_num_seqs: int  # requests per step at most
    max_model_len: int  # context length at most
    block_size: int  # tokens per KV block

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is not accepted; it must be a positive int")

    @property
    def token_buckets(self) -> tuple[int, ...]:  # padded T of a step
        return power_of_two_buckets(MIN_TOKEN_BUCKET, self.max_num_batched_tokens)

    @property
    def seq_buckets(self) -> tuple[int, ...]:  # padded B of a step
        return power_of_two_buckets(1, self.max_num_seqs)

    @property
    def max_blocks_per_seq(self) -> int:  # width of every padded block table
        return -(-self.max_model_len // self.block_size)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (tokens, seqs) pair a step can be padded to, smallest first."""
        return [(t, b) for t in self.token_buckets for b in self.seq_buckets if b <= t]

    def pad(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The (tokens, seqs) bucket of a step with these sizes."""
        return (
            next_bucket(num_tokens, self.token_buckets, "tokens in one step"),
            next_bucket(num_seqs, self.seq_buckets, "requests in one step"),
        )
