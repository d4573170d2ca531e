"""Measure what bounds CPU inference here: memory read bandwidth and matmul FLOP/s.

Run by benchmarks/run.py (workload "machine") in a venv with torch; prints one
JSON line. Medians over several repetitions, on the benchmark's thread count.

- read bandwidth: torch.sum over a 512 MiB fp32 tensor (bytes read / time);
- copy bandwidth: dst.copy_(src) of the same size, counted as read + write;
- matmul: torch.mm of square matrices, 2*n^3 FLOPs per product, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bandwidth_seconds(torch: Any, nbytes: int, repeats: int) -> tuple[float, float]:
    """Median seconds to read (sum) and to copy an fp32 buffer of nbytes."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return (
        _median_seconds(lambda: src.sum(), repeats),
        _median_seconds(lambda: dst.copy_(src), repeats),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=512, help="bandwidth buffer size")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    nbytes = args.mib * 1024 * 1024
    read_s, copy_s = _bandwidth_seconds(torch, nbytes, args.repeats)

    def matmul_flops(n: int, dtype: torch.dtype, repeats: int) -> float:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        return 2.0 * n**3 / _median_seconds(lambda: torch.mm(a, b), repeats)

    result = {
        "threads": args.threads,
        "torch": torch.__version__,
        "read_gb_s": nbytes / read_s / 1e9,
        "copy_gb_s": 2 * nbytes / copy_s / 1e9,
        "fp32_matmul_gflop_s": matmul_flops(2048, torch.float32, args.repeats) / 1e9,
        # bf16 is 10-100x slower on CPUs without native bf16 units: a smaller size keeps it short.
        "bf16_matmul_gflop_s": matmul_flops(512, torch.bfloat16, 3) / 1e9,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
