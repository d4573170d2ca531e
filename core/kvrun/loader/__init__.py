"""Model checkpoints: locate (a path, a hub id, s3://), check and stream weights from
safetensors, PyTorch .bin, GGUF, or random ones (load_format="dummy").

    checkpoint = load_checkpoint(None, hf_hub_offline=False, use_modelscope=False)
    for name, tensor in checkpoint.iter_weights(torch.float32):
        ...

Tokenizers are built from a checkpoint by :func:`load_tokenizer` (re-exported from
:mod:`kvrun.tokenizer`).
"""

from kvrun.loader.checkpoint import Checkpoint, CheckpointFormat
from kvrun.loader.gguf_loader import SUPPORTED_GGUF_TYPES
from kvrun.loader.resolve import (
    DEFAULT_HUB_MODEL,
    default_model,
    engine_load_format,
    load_checkpoint,
    load_engine_checkpoint,
)
from kvrun.loader.s3 import S3Settings
from kvrun.tokenizer.loading import load_tokenizer

__all__ = [
    "DEFAULT_HUB_MODEL",
    "SUPPORTED_GGUF_TYPES",
    "Checkpoint",
    "CheckpointFormat",
    "S3Settings",
    "default_model",
    "engine_load_format",
    "load_checkpoint",
    "load_engine_checkpoint",
    "load_tokenizer",
]
