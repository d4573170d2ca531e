"""The host CPU: its model name and the instruction-set features kvrun's paths depend on.

Every platform runs its sampler, tokenizer and scheduler on the host, and the cpu and
openvino platforms run the model there too; which kernels they take (and how fast, or
whether a runtime's own kernels are right) depends on these features. Machines of one
kind may come with either of two CPUs (AMD Zen 4: AVX-512 with AVX512_BF16; Intel
Sapphire Rapids: the same plus AVX512_FP16 and AMX tiles), so the start-up log and
``kvrun plugins`` name them. Read from /proc/cpuinfo (Linux); elsewhere only the
model is known.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FEATURES", "HostCpu", "host_cpu", "parse_cpuinfo"]

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

    def has(self, feature: str) -> bool:
        """Whether the CPU has ``feature`` (a FEATURES name, e.g. "AVX512_FP16")."""
        return feature in self.features

    def describe(self) -> str:
        """One line: "Intel(R) Xeon(R) Processor: AVX2 AVX512 AVX512_BF16 ..."."""
        return f"{self.model}: {' '.join(self.features) or 'no AVX2, AVX-512 or AMX'}"


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


@functools.cache
def host_cpu() -> HostCpu:
    """This machine's CPU (read once)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)
