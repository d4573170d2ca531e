"""Micro-benchmark: the CPU platform's attention backends on SmolLM2-135M's shapes.

One layer's ``forward`` (cache write + attention) per timing, 9 query heads and 3 kv
heads of 64, block size 16, block ids shuffled. Backends run alternately; each number
is the median of --runs timings, in milliseconds.

    python plugins/cpu/benchmarks/bench_attention.py [--runs 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun_cpu.attention import TorchSdpaAttention
from kvrun_cpu.native import load_native

HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 9, 3, 64, 16, 6000
# wall: what a user waits for; cpu: this process's CPU time, which other processes on a
# busy machine disturb far less (meaningful with --threads 1).
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
SPEC = AttentionLayerSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5)


def make_meta(requests: list[tuple[int, int]], gen: torch.Generator) -> AttentionMetadata:
    """Metadata for (cached tokens, new tokens) per request, on shuffled blocks."""
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, slots, starts = [], [], [0]
    for cached, new in requests:
        table = [free.pop() for _ in range(-(-(cached + new) // BLOCK))]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
        starts.append(starts[-1] + new)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        num_tokens=starts[-1],
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in requests], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens=[n for _, n in requests],
        seq_lens_host=[c + n for c, n in requests],
        block_size=BLOCK,
        max_query_len=max(n for _, n in requests),
        max_seq_len=max(c + n for c, n in requests),
    )


SCENARIOS: dict[str, list[tuple[int, int]]] = {
    "decode 1 x 600": [(599, 1)],
    "decode 16 x 100..600": [(100 + 33 * i, 1) for i in range(16)],
    "decode 64 x 600": [(599, 1)] * 64,
    "decode 64 x 20..600": [(20 + 9 * i, 1) for i in range(64)],
    "prefill 512": [(0, 512)],
    "prefill 2048": [(0, 2048)],
    "chunk 512 after 600 cached": [(600, 512)],
    "mixed 32 decodes + chunk 256": [(300, 1)] * 32 + [(0, 256)],
}


def time_forward(
    backend: AttentionBackend,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    gen: torch.Generator,
    clock: Callable[[], float],
) -> float:
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    start = clock()
    backend.forward(q, k, v, cache, meta)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall")
    args = parser.parse_args()
    clock = TIMERS[args.timer]
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {isa}, {threads} threads, {args.runs} runs, {args.timer} time"
    )
    native, why = load_native(Path(tempfile.mkdtemp()), torch.get_num_threads())
    if native is None:
        raise SystemExit(f"native kernels unavailable: {why}")
    backends: list[AttentionBackend] = [
        ReferenceAttention(SPEC),
        TorchSdpaAttention(SPEC),
        TorchSdpaAttention(SPEC, native=native),
    ]
    names = "REFERENCE ms | TORCH_SDPA, torch paths ms | TORCH_SDPA, native kernels ms"
    print(f"| scenario | {names} | speed-up |")
    print("|---|" + "---:|" * (len(backends) + 1))
    gen = torch.Generator().manual_seed(0)
    caches = [
        torch.randn(b.kv_cache_shape(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM), generator=gen)
        for b in backends
    ]
    for name, requests in SCENARIOS.items():
        meta = make_meta(requests, gen)
        times: list[list[float]] = [[] for _ in backends]
        for i in range(args.runs + 1):
            for b, backend in enumerate(backends):
                t = time_forward(backend, caches[b], meta, gen, clock)
                if i:  # the first round warms up
                    times[b].append(t)
        ms = [statistics.median(t) * 1e3 for t in times]
        cells = " | ".join(f"{m:.2f}" for m in ms)
        print(f"| {name} | {cells} | {ms[0] / ms[-1]:.2f}x |")


if __name__ == "__main__":
    main()
