"""The host CPU: its model name and the instruction-set features kvrun's paths depend on.

Every platform runs its sampler, tokenizer and scheduler on the host, and the cpu and
openvino platforms run the model there too; which kernels they take (and how fast, or
whether a runtime's own kernels are right) depends on these features. Machines of one
kind may come with either of two CPUs (AMD Zen 4: AVX-512 with AVX512_BF16; Intel
Sapphire Rapids: the same plus AVX512_FP16 and AMX tiles), so the start-up log and
``kvrun plugins`` name them. Read from /proc/cpuinfo (Linux); elsewhere only the
model is known. Where the CPU has AMX, :func:`host_cpu` also says whether Linux grants
this process the tiles (it must ask first: arch_prctl ARCH_REQ_XCOMP_PERM), which
decides whether AMX kernels can run here at all.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FEATURES", "HostCpu", "host_cpu", "parse_cpuinfo", "request_amx_tiles"]

# The features that change a path, by their /proc/cpuinfo flag, in the order shown.
FEATURES: dict[str, str] = {
    "avx2": "AVX2",
    "avx512f": "AVX512",
    "avx512_bf16": "AVX512_BF16",
    "avx512_fp16": "AVX512_FP16",
    "amx_bf16": "AMX_BF16",
    "amx_int8": "AMX_INT8",
    "amx_fp16": "AMX_FP16",
}


@dataclass(frozen=True)
class HostCpu:
    model: str  # "Intel(R) Xeon(R) Processor", or platform.processor() where unknown
    features: tuple[str, ...]  # FEATURES' names this CPU has, in FEATURES' order
    # With AMX: "granted" or "refused: <why>" (Linux's answer to this process); else None
    amx_tiles: str | None = None

    def has(self, feature: str) -> bool:
        """Whether the CPU has ``feature`` (a FEATURES name, e.g. "AVX512_FP16")."""
        return feature in self.features

    def describe(self) -> str:
        """One line: "Intel(R) Xeon(R) Processor: AVX2 AVX512 AVX512_BF16 ... (AMX tiles
        granted)"."""
        line = f"{self.model}: {' '.join(self.features) or 'no AVX2, AVX-512 or AMX'}"
        return line if self.amx_tiles is None else f"{line} (AMX tiles {self.amx_tiles})"


def parse_cpuinfo(text: str) -> HostCpu:
    """The first processor's model name and features from /proc/cpuinfo's text."""
    model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if not line.strip() and model:  # the end of the first processor's block
            break
    return HostCpu(
        model or platform.processor() or platform.machine(),
        tuple(name for flag, name in FEATURES.items() if flag in flags),
    )


_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 0x1023, 18


def request_amx_tiles() -> str:
    """Ask Linux for the AMX tile state for this process: "granted" or "refused: <why>".

    The permission is the whole process's, once granted; asking again is harmless."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "refused: not x86_64 Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return "granted"
    code = ctypes.get_errno()
    name = errno.errorcode.get(code, str(code))
    return f"refused: arch_prctl ARCH_REQ_XCOMP_PERM: {name} ({os.strerror(code)})"


@functools.cache
def host_cpu() -> HostCpu:
    """This machine's CPU (read once), with Linux's answer on the AMX tiles."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    cpu = parse_cpuinfo(text)
    if not cpu.has("AMX_BF16") and not cpu.has("AMX_INT8"):
        return cpu
    return HostCpu(cpu.model, cpu.features, request_amx_tiles())
