"""torch.profiler traces on demand, written under VLLM_TORCH_PROFILER_DIR."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from kvrun.errors import ConfigError

__all__ = ["start_profile", "stop_profile"]

logger = logging.getLogger(__name__)


def start_profile(trace_dir: str | None, running: Any) -> Any:
    """Start a profiler that writes a trace to ``trace_dir`` when stopped."""
    if trace_dir is None:
        raise ConfigError(
            "profiling needs VLLM_TORCH_PROFILER_DIR set to the directory traces go to"
        )
    if running is not None:
        return running
    os.makedirs(trace_dir, exist_ok=True)
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        record_shapes=True,
        with_stack=False,
        on_trace_ready=torch.profiler.tensorboard_trace_handler(trace_dir, use_gzip=True),
    )
    profiler.start()
    logger.info("profiling started; traces go to %s", trace_dir)
    return profiler


def stop_profile(profiler: Any) -> None:
    if profiler is None:
        return
    profiler.stop()
    logger.info("profiling stopped; trace written")
