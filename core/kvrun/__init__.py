"""kvrun: a pluggable, multi-backend LLM inference runtime.

Importing kvrun reads no variable, loads no plugin and touches no device: the
public names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvrun.version import __version__

if TYPE_CHECKING:
    from kvrun.entrypoints.llm import LLM
    from kvrun.lora.request import LoRARequest
    from kvrun.outputs import CompletionOutput, RequestOutput
    from kvrun.platforms import Platform
    from kvrun.pooling import PoolingParams
    from kvrun.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "LoRARequest",
    "Platform",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]

_LAZY = {
    "LLM": "kvrun.entrypoints.llm",
    "BeamSearchParams": "kvrun.sampling_params",
    "CompletionOutput": "kvrun.outputs",
    "LoRARequest": "kvrun.lora.request",
    "RequestOutput": "kvrun.outputs",
    "Platform": "kvrun.platforms",
    "PoolingParams": "kvrun.pooling",
    "SamplingParams": "kvrun.sampling_params",
    "StructuredOutputsParams": "kvrun.sampling_params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvrun' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
