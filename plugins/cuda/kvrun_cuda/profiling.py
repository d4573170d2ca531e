"""The dummy forward that memory profiling measures now lives in the core.

Kept as a re-export so existing imports keep working; the engine builds the run
(kvrun.engine.profile_run) and calls CudaPlatform.measure_peak_memory with it.
"""

from __future__ import annotations

from kvrun.engine.profile_run import dummy_chunks, make_profile_run

__all__ = ["dummy_chunks", "make_profile_run"]
