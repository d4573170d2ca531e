"""The :class:`Checkpoint`: a located, checked model whose weights can be streamed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from kvrun.errors import ModelLoadError
from kvrun.ops import reference

if TYPE_CHECKING:
    from kvrun.loader.awq import Dequantize
    from kvrun.loader.safetensors_loader import Narrow

__all__ = ["Checkpoint", "CheckpointFormat"]

# How the weights are stored: "dummy" = none, random ones are made (load_format="dummy");
# "none" = opened for its config and tokenizer only (load_checkpoint(weights=False)).
CheckpointFormat = Literal["safetensors", "pt", "gguf", "dummy", "none"]


@dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint that :func:`kvrun.loader.load_checkpoint` found and checked.

    Invariants: every file in ``weight_files`` exists and its header was checked (a
    ``pt`` file: it loads with torch.load(weights_only=True)); ``hf_config`` has
    ``architectures`` and went through :func:`kvrun.loader.hf_config.normalize_hf_config`.
    ``dummy`` and ``none`` checkpoints have no weight files.
    """

    source: str  # the path or hub id the user gave, for messages
    hf_config: dict[str, Any]  # config.json content (synthesized for GGUF), normalized
    format: CheckpointFormat  # how the weights are stored
    directory: Path  # holds config.json and tokenizer files; a GGUF file's own directory
    weight_files: tuple[Path, ...]  # safetensors / .bin files in load order, or the one .gguf
    num_tensors: int  # how many stored tensors iter_weights reads (its progress bar's total)
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json, {}
    # GGUF key/value metadata (tokenizer vocabulary included); empty for safetensors
    gguf_metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The parsed gguf.GGUFReader, kept so the weights are read without parsing the file's
    # metadata (seconds for a 49k-token vocabulary) a second time; None for safetensors.
    gguf_reader: Any = field(default=None, repr=False, compare=False)
    dummy_seed: int = 0  # format "dummy": the seed its random weights are drawn from

    @property
    def gguf_file(self) -> Path | None:
        """The .gguf file, or None for any other format."""
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
        keep_quantized: frozenset[str] = frozenset(),
        select: Callable[[str], bool] | None = None,
        narrow: Narrow | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """Yield (Hugging Face parameter name, tensor) pairs, each converted to ``dtype``.

        Names are as transformers names the parameters ("model.layers.0.self_attn.
        q_proj.weight", "model.embed_tokens.weight"). GGUF, AWQ (:mod:`kvrun.loader.awq`)
        and fp8 (:mod:`kvrun.loader.fp8`) tensors are dequantized, and GGUF's Llama Q/K rows un-permuted. A tied checkpoint
        yields no "lm_head.weight" unless the file stores one. Tensors are new CPU tensors
        the caller owns, except AWQ layers' weights when ``awq_device`` is given: those
        are made there, by ``awq_dequantize`` (the platform's op; default: the reference).
        A ``dummy`` checkpoint yields random tensors (:mod:`kvrun.loader.dummy`), the same
        for the same ``dummy_seed``; a ``none`` one raises ModelLoadError.
        ``progress`` shows a tqdm bar on stderr. A GGUF file's matrices named in
        ``keep_quantized`` come as :class:`kvrun.quantization.QuantizedMatrix` blocks
        (``quantization="gguf"``: :func:`kvrun.quantization.plan_quantized_load`), and so
        do an AWQ checkpoint's layers named there (``quantization="awq"``).
        ``select``: only the names it accepts are yielded (a pipeline stage's; safetensors
        files do not even read the others). ``narrow``: each tensor is only the parts it
        names (a tensor-parallel rank's share: plain safetensors files read just those
        bytes; other formats, AWQ and fp8 are read whole, dequantized, then cut).
        """
        from tqdm.auto import tqdm

        from kvrun.loader.awq import awq_config, merge_awq
        from kvrun.loader.fp8 import fp8_config, merge_fp8

        awq = fp8 = None
        total = self.num_tensors
        if self.format == "none":
            raise ModelLoadError(
                f"model {self.source!r} was opened for its config and tokenizer only "
                "(weights=False); open it again to read its weights"
            )
        if self.format == "gguf":
            from kvrun.loader.gguf_loader import iter_gguf

            stored = iter_gguf(
                self.weight_files[0], self.hf_config, dtype, self.gguf_reader, keep_quantized
            )
        elif self.format == "dummy":
            from kvrun.loader.dummy import dummy_weight_spec, iter_dummy

            spec = dummy_weight_spec(self.hf_config, self.source)
            total = len(spec)
            std = self.hf_config.get("initializer_range")
            stored = iter_dummy(
                spec, dtype, self.dummy_seed, std if isinstance(std, float) else None
            )
        else:
            from kvrun.loader.pt_loader import iter_pt
            from kvrun.loader.safetensors_loader import iter_safetensors

            awq = awq_config(self.hf_config, self.source)
            fp8 = fp8_config(self.hf_config, self.source)
            # AWQ's int32 / float16 and fp8's float8 / float32 tensors are read as stored
            # and dequantised together.
            cast = dtype if awq is None and fp8 is None else None
            if self.format == "pt":
                stored = iter_pt(self.weight_files, cast)
            else:  # unselected tensors (and unwanted parts, where plain) are not even read
                plain = awq is None and fp8 is None
                stored = iter_safetensors(
                    self.weight_files, cast, select, narrow if plain else None
                )
                narrow = None if plain else narrow
        bar = tqdm(
            total=total,
            desc=f"Loading {self.name}",
            unit="tensor",
            disable=not progress,
            leave=False,
        )

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for pair in stored:
                bar.update(1)
                if select is None or select(pair[0]):
                    yield pair

        def cut(pairs: Iterator[tuple[str, Any]], narrow: Narrow) -> Iterator[tuple[str, Any]]:
            """The parts ``narrow`` names of tensors read whole (kept quantized blocks pass)."""
            from kvrun.loader.safetensors_loader import read_parts

            for name, tensor in pairs:
                whole = isinstance(tensor, torch.Tensor)
                plan = narrow(name, tuple(tensor.shape)) if whole else None
                yield name, tensor if plan is None else read_parts(tensor, plan)

        with bar:
            if awq is not None:
                out = merge_awq(
                    counted(), awq, dtype, self.source, awq_dequantize, awq_device, keep_quantized
                )
            elif fp8 is not None:
                out = merge_fp8(counted(), fp8, dtype, self.source)
            else:
                out = counted()
            yield from out if narrow is None else cut(out, narrow)
