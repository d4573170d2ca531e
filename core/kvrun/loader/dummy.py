"""Random weights of the right names and shapes (load_format ``dummy``), from config.json
alone: for benchmarks and tests that need a model's cost, not its answers.

Names and shapes are those of transformers' own class for the architecture, built on
the meta device (no memory, no weights read), under the names its ``save_pretrained``
writes, so they are exactly what a checkpoint of that config would store. Values: matrices from N(0, initializer_range), norm weights 1,
biases 0; each tensor from its own generator seeded by (seed, name), so a tensor does
not depend on the others or on the order they are read in, and the same seed gives the
same model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from kvrun.errors import ModelLoadError

__all__ = ["DummyTensor", "dummy_weight_spec", "iter_dummy"]

DummyTensor = tuple[str, tuple[int, ...]]  # (Hugging Face parameter name, shape)
_DEFAULT_STD = 0.02  # transformers' initializer_range default


def dummy_weight_spec(hf_config: Mapping[str, Any], source: str) -> list[DummyTensor]:
    """Every parameter's (name, shape) as transformers' class for the config defines it."""
    import transformers

    architecture = str(hf_config["architectures"][0])
    model_type = hf_config.get("model_type")
    model_cls = getattr(transformers, architecture, None)
    if not isinstance(model_type, str) or model_cls is None:
        raise ModelLoadError(
            f"model {source!r}: load_format='dummy' takes the weights' names and shapes from "
            f"transformers' class for the architecture, but {architecture!r} with model_type "
            f"{model_type!r} is not one transformers {transformers.__version__} knows"
        )
    values = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(
            f"model {source!r}: load_format='dummy': transformers cannot build "
            f"{architecture} from this config.json: {exc}"
        ) from exc
    return [(name, tuple(tensor.shape)) for name, tensor in _saved_state(model).items()]


def _saved_state(model: Any) -> dict[str, Any]:
    """The model's (meta) tensors under the names its checkpoint stores them: transformers
    5 keeps some weights fused in memory (a mixture's experts in one [E, ...] stack) and
    writes them per expert; the reverse conversion it saves with gives the stored names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: memory and checkpoint names are the same
        # named_parameters lists a tied lm_head once (as the embedding), as stored.
        return dict(model.named_parameters())
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return dict(revert_weight_conversion(model, state))


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def iter_dummy(
    spec: Sequence[DummyTensor], dtype: torch.dtype, seed: int, std: float | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, random tensor in ``dtype``) for ``spec``; drawn in float32 then cast, so
    every dtype rounds the same values. ``std``: the matrices' spread (None: 0.02)."""
    spread = _DEFAULT_STD if std is None else std
    for name, shape in spec:
        if name.endswith(".bias"):
            tensor = torch.zeros(shape)
        elif len(shape) == 1:  # norm weights: identity scaling
            tensor = torch.ones(shape)
        else:
            tensor = torch.empty(shape).normal_(0.0, spread, generator=_generator(seed, name))
        yield name, tensor.to(dtype)
