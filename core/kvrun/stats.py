"""The engine's gauges and counters, one type from the scheduler to /metrics."""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.scheduling.output import SchedulerStats

__all__ = ["EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """After the engine's latest step: the scheduler's snapshot as it is, and the
    engine's token counters (cumulative). The server's engine process sends it to the
    frontend unchanged (msgspec encodes the dataclasses), where /metrics reads it under
    vLLM's metric names."""

    scheduler: SchedulerStats
    prompt_tokens_total: int  # prompt tokens of every request added
    generation_tokens_total: int  # tokens generated, every sequence
