"""AMX tiles: asking Linux for them, and what to say where they cannot be used.

A process must ask Linux for the tiles' register state (arch_prctl
ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) before its first tile instruction, or
that instruction kills it with SIGILL. ``csrc/amx_bf16.c``'s ``kvrun_amx_init`` asks
(the permission is the whole process's, for the threads OpenMP already started too)
and switches the library's bf16 matmuls to the tiles only where it was granted;
otherwise :func:`kvrun_cpu.native.load_native` falls back to the AVX512_BF16 build and
logs why, once per process and reason.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any

__all__ = ["AMX_ISA", "FALLBACK_ISA", "INIT_ERRORS", "describe_init", "init_tiles", "log_fallback"]

logger = logging.getLogger("kvrun.cpu")

AMX_ISA = "AMX_BF16"  # the build of csrc/amx_bf16.c (build._ISA_FLAGS)
FALLBACK_ISA = "AVX512_BF16"  # the next widest: vdpbf16ps on the same panels
# kvrun_amx_init's codes other than 0 (granted) and an errno.
INIT_ERRORS = {
    -1: "the library was built without AMX",
    -2: "CPUID reports no AMX-TILE/AMX-BF16",
    -3: "Linux accepted the request but does not list the tile data as permitted",
}


def init_tiles(amx_init: Any) -> str | None:
    """Ask for the tiles through a library's ``kvrun_amx_init``; None once granted,
    else why not."""
    return describe_init(int(amx_init()))


def describe_init(code: int) -> str | None:
    """What ``kvrun_amx_init``'s answer means: None (granted) or why the tiles are unused."""
    if code == 0:
        return None
    if code in INIT_ERRORS:
        return INIT_ERRORS[code]
    name = errno.errorcode.get(code, str(code))
    return (
        "Linux refused the AMX tile state "
        f"(arch_prctl ARCH_REQ_XCOMP_PERM: {name}, {os.strerror(code)})"
    )


@functools.cache
def log_fallback(reason: str) -> None:
    """Log once per process and reason that the bf16 matmuls run without the tiles."""
    logger.warning("AMX unused, bf16 matmuls on %s: %s", FALLBACK_ISA, reason)
