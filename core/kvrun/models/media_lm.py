"""A Qwen2-family decoder fed by a media encoder: what Qwen2-VL and Qwen2-Audio share.

The runner calls :meth:`MediaCausalLM.encode` for each media item (caching the rows by
content hash), :meth:`MediaCausalLM.embed_tokens` for a step's token rows, and
``forward`` with ``inputs_embeds`` when a chunk covers media rows; a step with no media
rows is the plain decoder's, which the fused decode step may take.

A subclass builds its encoder in ``__init__`` (an object with ``destinations()``, the
checkpoint names of its tensors, and ``prepare()``, run once after loading), maps the
checkpoint's names onto the Llama family's in :meth:`canonical_name`, and implements
``encode``.

LoRA adapters apply to the language model only (vLLM's default too): PEFT names its
modules ``model.language_model.layers.N...`` (transformers 5); an adapter on a module of
the encoder (the subclass's ``lora_encoders``) is refused naming that module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from kvrun.models.layout import DECODER_LAYOUT
from kvrun.models.llama import LlamaForCausalLM
from kvrun.models.weights import fill_parameters

if TYPE_CHECKING:
    from kvrun.lora.targets import LoraTargets

__all__ = ["MediaCausalLM", "MediaEncoder"]


class MediaEncoder(Protocol):
    """A vision or audio tower as :class:`MediaCausalLM` loads it."""

    def destinations(self) -> dict[str, torch.Tensor]: ...  # checkpoint name -> tensor

    def prepare(self) -> None: ...  # once, after every tensor is filled


class MediaCausalLM(LlamaForCausalLM):
    """The Llama-family decoder plus a media encoder (see the module docstring)."""

    decoder_layout: ClassVar[str] = DECODER_LAYOUT
    supports_lora: ClassVar[bool] = True  # on the language model (module docstring)
    # the encoder's top-level module names, whose adapters are refused
    lora_encoders: ClassVar[tuple[str, ...]] = ()
    supports_multimodal: ClassVar[bool] = True
    # the decoder split as the Llama family's; the encoder replicated on every rank (each
    # rank of stage 0 encodes the media itself; later stages take the residual stream)
    supports_parallel: ClassVar[bool] = True
    encoder: MediaEncoder  # set by the subclass's __init__

    @staticmethod
    def canonical_name(name: str) -> str:
        """A checkpoint tensor's name as the decoder and the encoder's destinations
        spell it."""
        raise NotImplementedError

    def _destinations(self) -> dict[str, torch.Tensor]:
        dest = super()._destinations()
        dest.update(self.encoder.destinations())
        return dest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """As the Llama family's, after mapping the checkpoint's names
        (:meth:`canonical_name`); then the encoder prepares itself."""
        assert not self._prepared, "weights are loaded once"
        fill_parameters(
            self._destinations(),
            ((self.canonical_name(name), tensor) for name, tensor in weights),
            source=source,
            architecture=self.config.architecture,
            tied=self.config.tie_word_embeddings,
            also_fills=self._merged_alias,
        )
        self._prepare()
        self.encoder.prepare()

    def lora_targets(self) -> LoraTargets:
        """The language model's LoRA surface; adapters on the encoder are refused."""
        from dataclasses import replace

        return replace(super().lora_targets(), encoders=self.lora_encoders)

    def encode(self, modality: str, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One media item's placeholder rows [length, H]."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.parallel is not None:  # the vocab-parallel lookup (every rank calls it)
            return self.parallel.embed(self.ops, input_ids, self.embed)
        rows: torch.Tensor = self.ops.embedding(input_ids, self.embed)
        return rows
