"""The :class:`Checkpoint`: a located, checked model whose weights can be streamed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from kvrun.ops import reference

if TYPE_CHECKING:
    from kvrun.loader.awq import Dequantize

__all__ = ["Checkpoint", "CheckpointFormat"]

CheckpointFormat = Literal["safetensors", "gguf"]


@dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint that :func:`kvrun.loader.load_checkpoint` found and checked.

    Invariants: every file in ``weight_files`` exists and its header was checked;
    ``hf_config`` has ``architectures`` and went through
    :func:`kvrun.loader.hf_config.normalize_hf_config`.
    """

    source: str  # the path or hub id the user gave, for messages
    hf_config: dict[str, Any]  # config.json content (synthesized for GGUF), normalized
    format: CheckpointFormat  # how the weights are stored
    directory: Path  # holds config.json and tokenizer files; a GGUF file's own directory
    weight_files: tuple[Path, ...]  # safetensors files in load order, or the one .gguf file
    num_tensors: int  # how many stored tensors iter_weights reads (its progress bar's total)
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json, {}
    # GGUF key/value metadata (tokenizer vocabulary included); empty for safetensors
    gguf_metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The parsed gguf.GGUFReader, kept so the weights are read without parsing the file's
    # metadata (seconds for a 49k-token vocabulary) a second time; None for safetensors.
    gguf_reader: Any = field(default=None, repr=False, compare=False)

    @property
    def gguf_file(self) -> Path | None:
        """The .gguf file, or None for a safetensors checkpoint."""
        return self.weight_files[0] if self.format == "gguf" else None

    @property
    def name(self) -> str:
        """A short display name: the directory's or the GGUF file's name."""
        return self.weight_files[0].name if self.format == "gguf" else self.directory.name

    def iter_weights(
        self,
        dtype: torch.dtype,
        *,
        progress: bool = True,
        awq_dequantize: Dequantize = reference.awq_dequantize,
        awq_device: torch.device | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (Hugging Face parameter name, tensor) pairs, each converted to ``dtype``.

        Names are as transformers names the parameters ("model.layers.0.self_attn.
        q_proj.weight", "model.embed_tokens.weight"). GGUF and AWQ (:mod:`kvrun.loader.awq`)
        tensors are dequantized, and GGUF's Llama Q/K rows un-permuted. A tied checkpoint
        yields no "lm_head.weight" unless the file stores one. Tensors are new CPU tensors
        the caller owns, except AWQ layers' weights when ``awq_device`` is given: those
        are made there, by ``awq_dequantize`` (the platform's op; default: the reference).
        ``progress`` shows a tqdm bar on stderr.
        """
        from tqdm.auto import tqdm

        from kvrun.loader.awq import awq_config, merge_awq

        awq = None
        if self.format == "gguf":
            from kvrun.loader.gguf_loader import iter_gguf

            stored = iter_gguf(self.weight_files[0], self.hf_config, dtype, self.gguf_reader)
        else:
            from kvrun.loader.safetensors_loader import iter_safetensors

            awq = awq_config(self.hf_config, self.source)
            # AWQ's int32 / float16 tensors are read as stored and dequantised together.
            stored = iter_safetensors(self.weight_files, dtype if awq is None else None)
        bar = tqdm(
            total=self.num_tensors,
            desc=f"Loading {self.name}",
            unit="tensor",
            disable=not progress,
            leave=False,
        )

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for pair in stored:
                bar.update(1)
                yield pair

        with bar:
            if awq is None:
                yield from counted()
            else:
                yield from merge_awq(counted(), awq, dtype, self.source, awq_dequantize, awq_device)
