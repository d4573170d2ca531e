"""Model checkpoints: locate, check and stream weights from safetensors or GGUF.

    checkpoint = load_checkpoint(None, hf_hub_offline=False, use_modelscope=False)
    for name, tensor in checkpoint.iter_weights(torch.float32):
        ...

Tokenizers are built from a checkpoint by :func:`load_tokenizer` (re-exported from
:mod:`kvrun.tokenizer`).
"""

from kvrun.loader.checkpoint import Checkpoint, CheckpointFormat
from kvrun.loader.gguf_loader import SUPPORTED_GGUF_TYPES
from kvrun.loader.resolve import DEFAULT_HUB_MODEL, default_model, load_checkpoint
from kvrun.tokenizer.loading import load_tokenizer

__all__ = [
    "DEFAULT_HUB_MODEL",
    "SUPPORTED_GGUF_TYPES",
    "Checkpoint",
    "CheckpointFormat",
    "default_model",
    "load_checkpoint",
    "load_tokenizer",
]
