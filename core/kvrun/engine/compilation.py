"""torch.compile for the model's dense blocks, with its cache under VLLM_CACHE_ROOT.

``enforce_eager=False`` compiles each model's dense (non-attention) block once with
dynamic shapes; attention stays eager because the platforms' paged kernels are
opaque to the compiler. On the CPUs this project targets compiling costs start-up
time and gains nothing measurable (BENCHMARKS.md), which is why eager stays the
default there.

Inductor keeps its artefacts in ``$VLLM_CACHE_ROOT/torch_compile_cache`` so a
second start reuses them; ``VLLM_DISABLE_COMPILE_CACHE=1`` makes every start
compile afresh without reading or recording cached graphs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from kvrun.envs import EnvSnapshot

__all__ = ["CompileSettings", "compile_function", "compile_settings"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CompileSettings:
    """Where torch.compile caches, and whether it may."""

    cache_dir: Path  # $VLLM_CACHE_ROOT/torch_compile_cache
    use_cache: bool  # False under VLLM_DISABLE_COMPILE_CACHE=1


def compile_settings(env: EnvSnapshot) -> CompileSettings:
    return CompileSettings(
        cache_dir=Path(env.VLLM_CACHE_ROOT) / "torch_compile_cache",
        use_cache=not env.VLLM_DISABLE_COMPILE_CACHE,
    )


def _apply(settings: CompileSettings) -> None:
    import torch._inductor.config as inductor_config

    # Inductor reads its cache directory from this variable on each use (and writes
    # it back itself), so setting it here is how the directory is chosen.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.cache_dir)
    # The graph and autotuning caches, not force_disable_caches: that one also turns
    # off profile-guided dynamism and warns on every compile.
    inductor_config.fx_graph_cache = settings.use_cache
    inductor_config.autotune_local_cache = settings.use_cache


def compile_function(fn: F, settings: CompileSettings, name: str) -> F:
    """``fn`` compiled lazily (on its first call) with dynamic shapes."""
    _apply(settings)
    logger.info(
        "torch.compile: %s, cache %s",
        name,
        settings.cache_dir if settings.use_cache else "disabled (VLLM_DISABLE_COMPILE_CACHE=1)",
    )
    compiled: F = torch.compile(fn, dynamic=True)  # type: ignore[assignment]
    return compiled
