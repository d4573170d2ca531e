"""Build the native kernels once with the system C compiler, cached by content.

Why not torch.utils.cpp_extension: the sources include no torch headers and are called
through ctypes, so they build in about a second on the 2-core target where a
cpp_extension build takes a minute. The library is cached under the caller's
directory by a hash of the sources, the flags and the ISA torch detected, never with
-march=native, so a shared cache directory is safe across machines.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = [
    "SOURCE_DIR",
    "compile_library",
    "default_isa",
    "find_compiler",
    "library_path",
    "supported_isas",
]

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_BASE_FLAGS = (
    "-O3",
    "-shared",
    "-fPIC",
    "-pthread",
    "-std=gnu11",
    "-fopenmp",
    "-fno-math-errno",
)
# Per ISA name, widest first: what the sources may assume. "AVX512" is torch's name for
# F+BW+VL+DQ; "AVX512_BF16" adds the bfloat16 dot product (packed_bf16.c).
_AVX512 = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX512_BF16": (*_AVX512, "-mavx512bf16"),
    "AVX512": _AVX512,
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
    "generic": (),
}


def supported_isas() -> list[str]:
    """Every ISA the sources target that this CPU runs, widest first (ends with generic)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or isa not in _ISA_FLAGS:
        return ["generic"]
    names = list(_ISA_FLAGS)
    found = names[names.index(isa) :]
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return ["AVX512_BF16", *found] if isa == "AVX512" and bf16 else found


def default_isa() -> str:
    """The widest ISA the sources target that this CPU runs."""
    return supported_isas()[0]


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def library_path(cache_dir: Path, isa: str) -> tuple[Path, tuple[str, ...]]:
    """Where the library for these sources, flags and ISA lives, and the flags."""
    flags = (*_BASE_FLAGS, *_ISA_FLAGS[isa])
    digest = hashlib.sha256()
    for part in (isa, *flags):
        digest.update(part.encode() + b"\0")
    for src in sorted(SOURCE_DIR.glob("*")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return cache_dir / f"kvrun_cpu_native_{isa}_{digest.hexdigest()[:16]}.so", flags


def find_compiler() -> str | None:
    """The C compiler on PATH (cc, gcc or clang), or None."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def compile_library(lib: Path, flags: tuple[str, ...]) -> str | None:
    """Build ``lib``; None on success, else why it failed.

    Each source compiles in its own process (they run in parallel), then one link.
    """
    compiler = find_compiler()
    if compiler is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    compile_flags = tuple(f for f in flags if f != "-shared")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            objects = [Path(tmp) / f"{src.stem}.o" for src in _sources()]
            jobs = [
                subprocess.Popen(
                    [compiler, *compile_flags, f"-I{SOURCE_DIR}", "-c", str(src), "-o", str(obj)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for src, obj in zip(_sources(), objects, strict=True)
            ]
            errors = [job.communicate(timeout=300)[1] for job in jobs]
            failed = [err for job, err in zip(jobs, errors, strict=True) if job.returncode != 0]
            tmp_lib = Path(tmp) / lib.name
            if not failed:
                link = subprocess.run(
                    [compiler, *flags, "-o", str(tmp_lib), *map(str, objects), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                if link.returncode != 0:
                    failed = [link.stderr]
            if failed:
                tail = failed[0].strip().splitlines()[-3:]
                return f"{compiler} failed: {' | '.join(tail)}"
            os.replace(tmp_lib, lib)  # atomic: a concurrent builder sees all or nothing
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build in {lib.parent}: {exc}"
    return None
