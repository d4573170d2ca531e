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
    from kvrun.outputs import CompletionOutput, RequestOutput
    from kvrun.platforms import Platform
    from kvrun.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Platform",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]

_LAZY = {
    "LLM": "kvrun.entrypoints.llm",
    "CompletionOutput": "kvrun.outputs",
    "RequestOutput": "kvrun.outputs",
    "Platform": "kvrun.platforms",
    "SamplingParams": "kvrun.sampling_params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvrun' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
