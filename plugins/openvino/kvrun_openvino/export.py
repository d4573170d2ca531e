"""Export a checkpoint to OpenVINO IR once, cached on disk, and make it paged.

Two stages, because OpenVINO cannot read back a saved IR that already holds its
PagedAttentionExtension op ("unsupported opset: extension"):

1. ``export_ir`` traces :class:`kvrun_openvino.graph.ExportDecoder`, makes the past
   K/V stateful (the paged-attention transformation refuses a stateless model),
   optionally compresses weights to int8, and saves the IR under
   ``$VLLM_CACHE_ROOT/openvino/<key>``, keyed by the checkpoint files and options.
2. ``paged_model`` reads that IR and applies the paged-attention transformation at
   every start (a fraction of a second), giving inputs input_ids, position_ids,
   past_lens, subsequence_begins, block_indices, block_indices_begins,
   max_context_len, logits_indices and key_cache.N / value_cache.N.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvrun.errors import ConfigError
from kvrun.loader.checkpoint import Checkpoint
from kvrun.models.config import ModelConfig

__all__ = ["EXPORT_VERSION", "ExportOptions", "export_ir", "ir_cache_dir", "paged_model"]

logger = logging.getLogger(__name__)

# Bump when ExportDecoder or the stateful conversion changes, so old IR is not reused.
EXPORT_VERSION = 2
_IR_NAME = "model.xml"


@dataclass(frozen=True)
class ExportOptions:
    """What changes the exported graph, beyond the checkpoint itself."""

    int8_weights: bool  # VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS: nncf int8 weight compression


def _input_names(layers: int) -> list[str]:
    fixed = ["input_ids", "attention_mask", "position_ids", "logits_indices", "beam_idx"]
    return fixed + [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def ir_cache_dir(cache_root: str, checkpoint: Checkpoint, options: ExportOptions) -> Path:
    """The directory one (checkpoint, options) pair's IR is kept in."""
    import openvino

    files = [
        {"path": str(f.resolve()), "size": f.stat().st_size, "mtime": f.stat().st_mtime_ns}
        for f in checkpoint.weight_files
    ]
    material = json.dumps(
        {
            "files": files,
            "config": checkpoint.hf_config,
            "int8": options.int8_weights,
            "export": EXPORT_VERSION,
            "openvino": openvino.get_version(),
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(material.encode()).hexdigest()[:20]
    return Path(cache_root) / "openvino" / digest


def export_ir(
    checkpoint: Checkpoint, model: ModelConfig, options: ExportOptions, cache_root: str
) -> Path:
    """The stateful IR's path, exporting it first unless a previous start already did."""
    final = ir_cache_dir(cache_root, checkpoint, options)
    if (final / _IR_NAME).is_file():
        logger.info("OpenVINO IR for %s reused from %s", checkpoint.source, final)
        return final / _IR_NAME
    import openvino

    # Build in a private sibling and rename, so a concurrent or killed export never
    # leaves a half-written IR where the next start would trust it.
    scratch = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    scratch.mkdir(parents=True)
    try:
        ov_model = _convert(checkpoint, model)
        if options.int8_weights:
            ov_model = _compress_int8(ov_model)
        openvino.save_model(ov_model, scratch / _IR_NAME, compress_to_fp16=False)
        try:
            scratch.rename(final)
        except OSError:
            if not (final / _IR_NAME).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("OpenVINO IR for %s exported to %s", checkpoint.source, final)
    return final / _IR_NAME


def _convert(checkpoint: Checkpoint, model: ModelConfig) -> Any:
    import openvino
    from openvino._offline_transformations import apply_make_stateful_transformation

    from kvrun_openvino.graph import ExportDecoder

    decoder = ExportDecoder(model, checkpoint.iter_weights(torch.float32, progress=False)).eval()
    batch, new, past = 1, 2, 1  # any small example: every dimension is made dynamic
    example: list[torch.Tensor] = [
        torch.ones(batch, new, dtype=torch.int64),
        torch.ones(batch, past + new, dtype=torch.int64),
        torch.arange(past, past + new, dtype=torch.int64).view(batch, new),
        torch.tensor([new - 1], dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int32),
    ]
    kv = torch.zeros(batch, model.num_kv_heads, past, model.head_dim)
    example += [kv] * (2 * model.num_layers)
    with torch.no_grad():
        ov_model = openvino.convert_model(decoder, example_input=tuple(example))
    for port, name in zip(ov_model.inputs, _input_names(model.num_layers), strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, _output_names(model.num_layers), strict=True):
        port.get_tensor().set_names({name})
    pairs = dict(
        zip(_input_names(model.num_layers)[5:], _output_names(model.num_layers)[1:], strict=True)
    )
    apply_make_stateful_transformation(ov_model, pairs)
    _give_states_an_initializer(ov_model, model)
    return ov_model


def _give_states_an_initializer(ov_model: Any, model: ModelConfig) -> None:
    """Feed each state an empty [batch, kv_heads, 0, head_dim] tensor as its initial value.

    The paged-attention pattern matches ReadValue nodes with one input; a bare
    make-stateful leaves them with none, and the transformation then silently
    matches nothing.
    """
    import numpy as np
    import openvino.opset13 as ops

    ids = ov_model.input("input_ids")
    batch = ops.gather(
        ops.shape_of(ids, output_type="i64"),
        ops.constant(np.array([0], dtype=np.int64)),
        ops.constant(np.int64(0)),
    )
    rest = ops.constant(np.array([model.num_kv_heads, 0, model.head_dim], dtype=np.int64))
    for node in ov_model.get_ops():
        if node.get_type_name() == "ReadValue":
            zero = ops.constant(np.zeros((), dtype=np.float32))
            node.set_arguments([ops.broadcast(zero, ops.concat([batch, rest], 0))])
    ov_model.validate_nodes_and_infer_types()


def _compress_int8(ov_model: Any) -> Any:
    try:
        import nncf  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError(
            "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS=1 needs nncf for int8 weight compression, "
            "and it is not installed: pip install nncf"
        ) from exc
    return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def paged_model(ir_path: Path) -> Any:
    """The exported IR with attention replaced by OpenVINO's paged attention."""
    import openvino
    from openvino._offline_transformations import paged_attention_transformation

    ov_model = openvino.Core().read_model(ir_path)
    paged_attention_transformation(ov_model)
    names = {n for port in ov_model.inputs for n in port.get_names()}
    # A graph the pattern did not match keeps its attention_mask and gains no caches.
    assert "key_cache.0" in names and "attention_mask" not in names, sorted(names)
    return ov_model
