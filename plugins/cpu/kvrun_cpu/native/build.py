"""Build the native kernels once with the system C compiler, cached by content.

Why not torch.utils.cpp_extension: the sources include no torch headers and are called
through ctypes, so they build in about a second on the 2-core target where a
cpp_extension build takes a minute. The library is cached under the caller's
directory by a hash of the sources, the flags and the ISA torch detected, never with
-march=native, so a shared cache directory is safe across machines.

The install-time variables vLLM's own build reads steer this one too
(:class:`BuildSettings`): CMAKE_BUILD_TYPE the optimisation and debug information,
MAX_JOBS how many compilers run at once, VERBOSE whether the commands and the
compiler's warnings are logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvrun.host_cpu import host_cpu

__all__ = [
    "SOURCE_DIR",
    "BuildSettings",
    "compile_library",
    "default_isa",
    "find_compiler",
    "library_path",
    "supported_isas",
]

logger = logging.getLogger("kvrun.cpu")

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
# Optimisation and debug information per CMAKE_BUILD_TYPE, as CMake's defaults for C
# (unset: Release).
_BUILD_TYPE_FLAGS: dict[str | None, tuple[str, ...]] = {
    None: ("-O3",),
    "Release": ("-O3",),
    "RelWithDebInfo": ("-O2", "-g"),
    "Debug": ("-O0", "-g"),
}
_BASE_FLAGS = (
    "-shared",
    "-fPIC",
    "-pthread",
    "-std=gnu11",
    "-fopenmp",
    "-fno-math-errno",
)
# Per ISA name, widest first: what the sources may assume. "AVX512" is torch's name for
# F+BW+VL+DQ; "AVX512_BF16" adds the bfloat16 dot product (packed_bf16.c); "AMX_BF16"
# adds the tiles (amx_bf16.c), used only once Linux grants them (native/amx.py). Every
# CPU with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4) has AVX512_VNNI, which the
# quantized matmuls (quant.c) use.
_AVX512 = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AMX_BF16": (*_AVX512, "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16"),
    "AVX512_BF16": (*_AVX512, "-mavx512bf16", "-mavx512vnni"),
    "AVX512": _AVX512,
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
    "generic": (),
}


@dataclass(frozen=True)
class BuildSettings:
    """How to build: the install-time variables, with the meaning vLLM's build gives them."""

    build_type: str | None = None  # CMAKE_BUILD_TYPE: Debug, Release, RelWithDebInfo
    jobs: int | None = None  # MAX_JOBS: compilers at once; None = one per source
    verbose: bool = False  # VERBOSE: log each command and the compiler's warnings

    @classmethod
    def from_env(cls, env: Any) -> BuildSettings:
        """From an :class:`kvrun.envs.EnvSnapshot` (its values are already validated)."""
        return cls(build_type=env.CMAKE_BUILD_TYPE, jobs=env.MAX_JOBS, verbose=env.VERBOSE)


def supported_isas() -> list[str]:
    """Every ISA the sources target that this CPU runs, widest first (ends with generic)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or isa not in _ISA_FLAGS:
        return ["generic"]
    names = list(_ISA_FLAGS)
    found = names[names.index(isa) :]
    if isa != "AVX512" or not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return found
    # /proc/cpuinfo lists amx_bf16 only where the kernel also supports the tile state.
    amx = host_cpu().has("AMX_BF16") and torch.cpu._is_amx_tile_supported()
    return ["AMX_BF16", "AVX512_BF16", *found] if amx else ["AVX512_BF16", *found]


def default_isa() -> str:
    """The widest ISA the sources target that this CPU runs."""
    return supported_isas()[0]


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def library_path(
    cache_dir: Path, isa: str, build_type: str | None = None
) -> tuple[Path, tuple[str, ...]]:
    """Where the library for these sources, flags and ISA lives, and the flags."""
    flags = (*_BUILD_TYPE_FLAGS[build_type], *_BASE_FLAGS, *_ISA_FLAGS[isa])
    digest = hashlib.sha256()
    for part in (isa, *flags):
        digest.update(part.encode() + b"\0")
    for src in sorted(SOURCE_DIR.glob("*")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return cache_dir / f"kvrun_cpu_native_{isa}_{digest.hexdigest()[:16]}.so", flags


def find_compiler() -> str | None:
    """The C compiler on PATH (cc, gcc or clang), or None."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def compile_library(
    lib: Path, flags: tuple[str, ...], jobs: int | None = None, verbose: bool = False
) -> str | None:
    """Build ``lib``; None on success, else why it failed.

    Each source compiles in its own process, ``jobs`` at a time (None: all at once),
    then one link. ``verbose`` logs every command and what the compiler printed.
    """
    compiler = find_compiler()
    if compiler is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    compile_flags = tuple(f for f in flags if f != "-shared")
    sources = _sources()
    batch = len(sources) if jobs is None else max(1, jobs)
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            objects = [Path(tmp) / f"{src.stem}.o" for src in sources]
            commands = [
                [compiler, *compile_flags, f"-I{SOURCE_DIR}", "-c", str(src), "-o", str(obj)]
                for src, obj in zip(sources, objects, strict=True)
            ]
            failed: list[str] = []
            for start in range(0, len(commands), batch):
                group = commands[start : start + batch]
                if verbose:
                    for command in group:
                        logger.info("native build: %s", " ".join(command))
                jobs_now = [
                    subprocess.Popen(
                        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                    )
                    for command in group
                ]
                for job in jobs_now:
                    err = job.communicate(timeout=300)[1]
                    if job.returncode != 0:
                        failed.append(err)
                    elif verbose and err.strip():
                        logger.info("native build: %s", err.strip())
            tmp_lib = Path(tmp) / lib.name
            if not failed:
                link = [compiler, *flags, "-o", str(tmp_lib), *map(str, objects), "-lm"]
                if verbose:
                    logger.info("native build: %s", " ".join(link))
                linked = subprocess.run(
                    link, capture_output=True, text=True, timeout=300, check=False
                )
                if linked.returncode != 0:
                    failed = [linked.stderr]
            if failed:
                tail = failed[0].strip().splitlines()[-3:]
                return f"{compiler} failed: {' | '.join(tail)}"
            os.replace(tmp_lib, lib)  # atomic: a concurrent builder sees all or nothing
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build in {lib.parent}: {exc}"
    return None
