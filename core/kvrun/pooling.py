"""Pooling: a model's hidden states for a prompt turned into one vector (embeddings,
scores) or into class probabilities, as vLLM's pooling runner does.

A model runs as a pooling model under ``runner="pooling"`` (``--runner pooling``), and a
generating engine serves embeddings beside generation too. A decoder language model is
converted to an embedding model (``convert="embed"``: the
last token's final hidden state, L2-normalised, by default) and a
``*ForSequenceClassification`` checkpoint is a classifier (``convert="classify"``: the
last token through its ``score`` head, then softmax). :class:`PoolerConfig` (vLLM's
``--pooler-config``) chooses the pooling (``LAST``, ``MEAN``, ``CLS`` = the first token)
and the normalisation; :class:`PoolingParams` is the per-request part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from kvrun.errors import ConfigError, RequestError

__all__ = [
    "CONVERTS",
    "POOLING_TYPES",
    "RUNNERS",
    "PoolerConfig",
    "PoolingParams",
    "pool_rows",
]

PoolingType = Literal["LAST", "MEAN", "CLS"]
POOLING_TYPES: tuple[PoolingType, ...] = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
TASKS = ("embed", "classify", "encode", "score")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class PoolerConfig:
    """How the pooling runner turns a prompt's hidden states into its output
    (vLLM's ``PoolerConfig``: ``pooling_type`` and ``normalize``)."""

    pooling_type: PoolingType = "LAST"
    normalize: bool = True  # embeddings are L2-normalised unless a request says otherwise

    def with_options(self, options: dict[str, Any]) -> PoolerConfig:
        """A copy with vLLM's ``pooler_config`` keys applied (pooling_type, normalize);
        a ConfigError names a value kvrun does not take."""
        kind = str(options.get("pooling_type", self.pooling_type)).upper()
        if kind not in POOLING_TYPES:
            raise ConfigError(
                f"pooler_config pooling_type {options.get('pooling_type')!r} is not supported; "
                f"accepted: {', '.join(POOLING_TYPES)}"
            )
        normalize = options.get("normalize", self.normalize)
        if not isinstance(normalize, bool):
            raise ConfigError(f"pooler_config normalize {normalize!r} is not true or false")
        return PoolerConfig(pooling_type=kind, normalize=normalize)  # type: ignore[arg-type]

    @property
    def needs_every_position(self) -> bool:
        """MEAN and CLS read positions a prefix-cache hit would skip."""
        return self.pooling_type != "LAST"


@dataclass(frozen=True, kw_only=True)
class PoolingParams:
    """One pooling request's options (vLLM's names).

    ``dimensions``: keep the first N values of the embedding (then normalise), for models
    trained for it (Matryoshka); ``normalize``: override the pooler's normalisation;
    ``activation``: softmax over a classifier's outputs (default on); ``task``: which
    output is wanted, set by the entry point (embed, classify, encode, score).
    """

    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (not _is_int(self.dimensions) or self.dimensions < 1):
            raise RequestError.invalid("dimensions", self.dimensions, "an int >= 1 or None")
        for name in ("normalize", "activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise RequestError.invalid(name, value, "true, false or None")
        if self.task is not None and self.task not in TASKS:
            raise RequestError.invalid("task", self.task, f"one of {', '.join(TASKS)} or None")

    def verify(self, hidden_size: int, matryoshka: tuple[int, ...] | bool) -> None:
        """Check what needs the model: ``dimensions`` only where the model was trained
        for it (its config's ``is_matryoshka`` or ``matryoshka_dimensions``)."""
        if self.dimensions is None:
            return
        if not matryoshka:
            raise RequestError(
                f"dimensions={self.dimensions} is not supported by this model: it was not "
                "trained for shortened embeddings (its config has no is_matryoshka or "
                "matryoshka_dimensions); omit dimensions",
                param="dimensions",
            )
        allowed = matryoshka if isinstance(matryoshka, tuple) else None
        if allowed is not None and self.dimensions not in allowed:
            accepted = ", ".join(str(d) for d in allowed)
            raise RequestError.invalid("dimensions", self.dimensions, f"one of {accepted}")
        if self.dimensions > hidden_size:
            raise RequestError.invalid(
                "dimensions", self.dimensions, f"an int in [1, {hidden_size}] (the model's size)"
            )


def pool_rows(
    rows: torch.Tensor,  # [P, H] the prompt's final hidden states (P = all, or the last one)
    pooling_type: PoolingType,
) -> torch.Tensor:  # [H] float32
    """The pooled vector of a prompt whose hidden states ``rows`` holds in order."""
    if pooling_type == "LAST":
        return rows[-1].float()
    if pooling_type == "CLS":
        return rows[0].float()
    return rows.float().mean(dim=0)


def finish_embedding(
    vector: torch.Tensor, *, normalize: bool, dimensions: int | None
) -> torch.Tensor:  # [D] float32
    """Cut to ``dimensions`` (Matryoshka), then L2-normalise when asked."""
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = F.normalize(vector, p=2, dim=-1)
    return vector


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two embeddings (vLLM's score for embedding models)."""
    value = float(F.cosine_similarity(a.float(), b.float(), dim=-1))
    return value if math.isfinite(value) else 0.0
