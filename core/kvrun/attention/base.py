"""The attention contract: batch metadata and the backend interface.

The model runner builds one :class:`AttentionMetadata` per step and hands it to
every attention layer. A batch is a flat run of tokens from several requests: the
new tokens of request ``i`` are ``query_start_loc[i]:query_start_loc[i+1]``, and
they sit at the end of that request's context of ``seq_lens[i]`` tokens. A decode
is a request whose query length is 1; a prefill (or a prefill chunk, or a prefill
after a prefix-cache hit) has a query longer than 1 and may start after tokens
already in the cache.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from kvrun.errors import ConfigError

__all__ = ["AttentionBackend", "AttentionLayerSpec", "AttentionMetadata", "with_latent_cache"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionLayerSpec:
    """What an attention backend needs to know about the model's attention."""

    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query when fewer than num_heads)
    head_dim: int
    scale: float  # softmax scale, usually head_dim ** -0.5
    # The model's activation dtype, so an automatic choice can pass over a backend that
    # cannot run it; None = not known (the platform's check_config checks it later).
    dtype: torch.dtype | None = None
    # The KV cache's dtype when it differs from the model's (fp8); None = the model dtype.
    kv_cache_dtype: torch.dtype | None = None
    # A query at position p sees only keys at positions > p - sliding_window (itself and
    # the W - 1 before it); None = every earlier position (Gemma's local layers).
    sliding_window: int | None = None
    # Scores (after the scale) become c * tanh(scores / c) before the softmax; None = as
    # they are (Gemma 2).
    logit_softcap: float | None = None
    # Multi-head latent attention's single-plane cache (feature "latent_kv"): the layer
    # caches keys only, num_kv_heads x head_dim values per token in one plane instead of
    # two, and each cached token's value is the first latent_value_dim columns of its
    # key; forward then returns [T, num_heads, latent_value_dim] (DeepSeek: key [c | k_pe],
    # value c, its first kv_lora_rank columns). None = keys and values in planes of their own.
    latent_value_dim: int | None = None

    def __post_init__(self) -> None:
        v = self.latent_value_dim
        if v is not None and not 1 <= v <= self.head_dim:
            raise ConfigError(
                f"latent_value_dim={v}: the value is the first columns of the cached key, "
                f"so it must lie in 1..head_dim={self.head_dim}"
            )

    @property
    def features(self) -> frozenset[str]:
        """What this spec asks beyond plain causal attention: the names backends declare."""
        asked = {
            "sliding_window": self.sliding_window,
            "logit_softcap": self.logit_softcap,
            "latent_kv": self.latent_value_dim,
        }
        return frozenset(name for name, value in asked.items() if value is not None)

    @property
    def kv_planes(self) -> int:
        """Planes of num_kv_heads x head_dim values a token takes in the cache: 2 (keys and
        values), or 1 for the latent cache (the value is read from the key)."""
        return 1 if self.latent_value_dim is not None else 2


@dataclass
class AttentionMetadata:
    """One step's batch layout, shared by all layers. Tensors live on the platform device."""

    num_tokens: int  # T: new tokens in this step, all requests together
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for each new token
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative query lengths, starts at 0
    seq_lens: torch.Tensor  # [B] int32: context length of each request after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids, padded with 0
    query_lens: list[int]  # [B] host copy of the query lengths
    seq_lens_host: list[int]  # [B] host copy of seq_lens
    block_size: int  # tokens per KV block
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Attention over a paged KV cache, for one platform.

    Invariants an implementation keeps:
    - ``forward`` first writes the step's new keys and values into the cache at
      ``meta.slot_mapping``, then attends each new query token to every context token
      of its own request up to and including its own position (causal), never to
      another request's tokens.
    - The KV cache of one layer is one tensor of ``kv_cache_shape(...)`` as allocated
      by the platform's allocator; the backend never reallocates it.
    - Grouped-query attention maps query head ``h`` to kv head ``h // (num_heads //
      num_kv_heads)``.
    - The result equals :class:`kvrun.attention.reference.ReferenceAttention` within
      floating-point tolerance.
    - A backend that lists ``"latent_kv"`` in ``features`` implements
      :meth:`latent_kv_cache_shape` and, for a spec with ``latent_value_dim``, keeps one
      plane per layer: ``forward`` stores ``key`` only (callers pass the key again as
      ``value``, which is not read) and attends with each cached token's value equal to
      the first ``latent_value_dim`` columns of its key, returning
      ``[T, num_heads, latent_value_dim]``.
    """

    name: ClassVar[str]
    # The spec features (AttentionLayerSpec.features) this backend computes; a spec asking
    # for another is refused when the backend is made.
    features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: AttentionLayerSpec) -> None:
        self._check_features(spec)
        self.spec = spec

    def _check_features(self, spec: AttentionLayerSpec) -> None:
        missing = sorted(spec.features - self.features)
        if missing:
            supported = ", ".join(sorted(self.features)) or "none"
            raise ConfigError(
                f"attention backend {self.name} does not compute {', '.join(missing)} "
                f"(asked by the model: {_describe(spec)}); the features it computes: "
                f"{supported}"
            )

    def variant(self, **changes: Any) -> AttentionBackend:
        """This backend for another layer's spec (``dataclasses.replace`` of its own), e.g.
        ``variant(sliding_window=4096)`` for Gemma's local layers: the same kernels and
        cache layout; a ConfigError when the backend does not compute what it asks."""
        spec = replace(self.spec, **changes)
        self._check_features(spec)
        other = copy.copy(self)
        other.spec = spec
        return other

    @staticmethod
    @abstractmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV-cache tensor."""

    @staticmethod
    def latent_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's single-plane (latent) cache; backends with "latent_kv"."""
        raise NotImplementedError("this attention backend keeps no single-plane latent cache")

    def layer_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's cache for this backend's spec: one plane (latent) or two."""
        if self.spec.latent_value_dim is not None:
            return self.latent_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        return self.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # one layer's cache, kv_cache_shape(...)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store the new K/V in the cache and return the attention output."""


def with_latent_cache(backend: AttentionBackend, value_dim: int) -> AttentionBackend:
    """``backend`` over a single-plane latent cache whose value is each key's first
    ``value_dim`` columns (multi-head latent attention), where it computes "latent_kv".

    Otherwise ``backend`` itself, with the reason logged: the caller then passes the key
    as the value too and the cache holds it twice (two planes), which is exact but
    costs twice the bytes per token.
    """
    if "latent_kv" in backend.features:
        return backend.variant(latent_value_dim=value_dim)
    values = backend.spec.num_kv_heads * backend.spec.head_dim
    logger.info(
        "attention backend %s keeps no single-plane latent cache (feature latent_kv): the "
        "latent is cached as key and as value, 2 x %d values per token and layer",
        backend.name,
        values,
    )
    return backend


def _describe(spec: AttentionLayerSpec) -> str:
    parts = []
    if spec.sliding_window is not None:
        parts.append(f"sliding_window={spec.sliding_window}")
    if spec.logit_softcap is not None:
        parts.append(f"logit_softcap={spec.logit_softcap}")
    if spec.latent_value_dim is not None:
        parts.append(f"a single-plane latent cache, value = key[:, :{spec.latent_value_dim}]")
    return ", ".join(parts)
