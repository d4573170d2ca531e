"""Micro-benchmark: each CPU op, as CpuPlatform.ops() hands it out (bound to the native
kernels), against the core's reference op.

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 9 query heads and 3 kv heads
of 64); ``fused_moe`` runs a Mixtral-shaped mixture (see MOE_*). Reference and CPU op run alternately, so load from other processes hits both
alike; each number is the median of --runs timings. ``linear`` runs all 30 layers'
projections (425 MB of float32 weights, more than any cache holds), plain weights
through the reference against weights from ``prepare_linear``.

    python plugins/cpu/benchmarks/bench_ops.py [--runs 200] [--threads N] [--only fused_moe]

``--paths`` compares the matmul paths instead (:func:`path_cases`): the native bf16
matmul on AMX tiles (the AMX_BF16 build) and on vdpbf16ps (the AVX512_BF16 build) on
the same packed panels, the native float32 matmul, and torch's bf16 and float32
F.linear (oneDNN), for decode-like (1..16 tokens) and prefill-like (64..512) batches of
SmolLM2-135M's and a 1B Llama's (Llama-3.2-1B's sizes) projections and lm_head;
medians of the runs, taken in turns.

    python plugins/cpu/benchmarks/bench_ops.py --paths [--runs 9] [--only 1b]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvrun.ops import OpTable, reference, reference_ops
from kvrun_cpu import ops
from kvrun_cpu.native import load_native

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 576, 1536, 9, 3, 64, 16


# wall: what a user waits for; cpu: this process's CPU time, which other processes on a
# busy machine disturb far less (meaningful with --threads 1).
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def compare(
    runs: int, ref: Callable[[], Any], mine: Callable[[], Any], clock: Callable[[], float]
) -> tuple[float, float]:
    """Median microseconds of the reference and of ours, run alternately."""

    def timed(fn: Callable[[], Any]) -> float:
        start = clock()
        fn()
        return clock() - start

    for _ in range(3):
        ref(), mine()
    ref_t, mine_t = [], []
    for _ in range(runs):
        ref_t.append(timed(ref))
        mine_t.append(timed(mine))
    return statistics.median(ref_t) * 1e6, statistics.median(mine_t) * 1e6


def cpu_table() -> OpTable:
    native, why = load_native(Path(tempfile.mkdtemp()), torch.get_num_threads())
    if native is None:
        print(f"(native kernels unavailable, torch paths only: {why})")
    return reference_ops().with_overrides(ops.cpu_ops(native), "kvrun-cpu")


def linear_cases(cpu: OpTable) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    g = torch.Generator().manual_seed(2)
    shapes = [((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN)]
    shapes += [(2 * INTER, HIDDEN), (HIDDEN, INTER)]
    plain = [[torch.randn(n, k, generator=g) for n, k in shapes] for _ in range(30)]
    prepared = [[cpu.prepare_linear(w) for w in layer] for layer in plain]
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for tokens in (1, 8, 64):
        xs = {k: torch.randn(tokens, k, generator=g) for _, k in shapes}

        def ref(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in plain:
                for w in layer:
                    reference.linear(xs[w.shape[1]], w)

        def mine(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in prepared:
                for w, (_, k) in zip(layer, shapes, strict=True):
                    cpu.linear(xs[k], w)

        out[f"linear, 30 layers x {tokens} tokens"] = (ref, mine)
    return out


def cases(cpu: OpTable, tokens: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, HIDDEN, generator=g)
    res = torch.randn(tokens, HIDDEN, generator=g)
    w = torch.randn(HIDDEN, generator=g)
    # q, k and v sliced from one fused projection, as the model does
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)
    q_alone, k_alone = q.contiguous(), k.contiguous()
    pos = torch.randint(0, 2048, (tokens,), generator=g)
    cos_sin = torch.randn(2048, HEAD_DIM, generator=g)
    gate_up = torch.randn(tokens, 2 * INTER, generator=g)
    num_blocks = 4096
    kc = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:tokens]
    return {
        "rms_norm": (
            lambda: reference.rms_norm(x, w, 1e-5),
            lambda: cpu.rms_norm(x, w, 1e-5),
        ),
        "fused_add_rms_norm": (
            lambda: reference.fused_add_rms_norm(x, res, w, 1e-5),
            lambda: cpu.fused_add_rms_norm(x, res, w, 1e-5),
        ),
        "rotary_embedding (q, k from one qkv)": (
            lambda: reference.rotary_embedding(pos, q, k, cos_sin),
            lambda: cpu.rotary_embedding(pos, q, k, cos_sin),
        ),
        "rotary_embedding (separate q, k)": (
            lambda: reference.rotary_embedding(pos, q_alone, k_alone, cos_sin),
            lambda: cpu.rotary_embedding(pos, q_alone, k_alone, cos_sin),
        ),
        "silu_and_mul": (
            lambda: reference.silu_and_mul(gate_up),
            lambda: cpu.silu_and_mul(gate_up),
        ),
        "reshape_and_cache": (
            lambda: reference.reshape_and_cache(k, v, kc, vc, slots),
            lambda: cpu.reshape_and_cache(k, v, kc, vc, slots),
        ),
    }


def attention_cases(cpu: OpTable) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """paged_attention over the reference cache layout, as CpuPlatform.ops() hands it out."""
    paged_attention = cpu.paged_attention
    g = torch.Generator().manual_seed(1)
    num_blocks = 6000
    kc = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    vc = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    scenarios = {
        "decode 1 x 600": ([600], [1]),
        "decode 16 x 100..600": ([100 + 33 * i for i in range(16)], [1] * 16),
        "decode 64 x 600": ([600] * 64, [1] * 64),
        "prefill 512 after 600": ([1112], [512]),
    }
    for name, (seq_lens, query_lens) in scenarios.items():
        perm = torch.randperm(num_blocks, generator=g).tolist()
        width = -(-max(seq_lens) // BLOCK)
        tables = torch.tensor(
            [[perm.pop() for _ in range(width)] for _ in seq_lens], dtype=torch.int32
        )
        q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=g)
        args = (q, kc, vc, tables, seq_lens, query_lens, HEAD_DIM**-0.5)
        out[f"paged_attention {name}"] = (
            functools.partial(reference.paged_attention, *args),
            functools.partial(paged_attention, *args),
        )
    return out


# A Mixtral-shaped mixture scaled to this machine: 8 experts, top-2, hidden 1024,
# expert intermediate 3584 (Mixtral 8x7B is 4096 / 14336): 8 x 44 MB of float32 experts.
MOE_HIDDEN, MOE_INTER, MOE_EXPERTS, MOE_TOP_K = 1024, 3584, 8, 2


def moe_cases(cpu: OpTable) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """fused_moe: the reference (a loop over experts, F.linear each) against the cpu op
    (tokens sorted by expert, two grouped native matmuls) on prepared expert weights."""
    g = torch.Generator().manual_seed(3)
    w13 = [0.02 * torch.randn(2 * MOE_INTER, MOE_HIDDEN, generator=g) for _ in range(MOE_EXPERTS)]
    w2 = [0.02 * torch.randn(MOE_HIDDEN, MOE_INTER, generator=g) for _ in range(MOE_EXPERTS)]
    p13, p2 = [cpu.prepare_linear(w) for w in w13], [cpu.prepare_linear(w) for w in w2]
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for tokens in (1, 16, 64, 512):
        x = torch.randn(tokens, MOE_HIDDEN, generator=g)
        probs = torch.randn(tokens, MOE_EXPERTS, generator=g).softmax(dim=-1)
        weights, ids = torch.topk(probs, MOE_TOP_K)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out[f"fused_moe 8 experts top-2, {tokens} tokens"] = (
            functools.partial(reference.fused_moe, x, w13, w2, weights, ids),
            functools.partial(cpu.fused_moe, x, p13, p2, weights, ids),
        )
    return out


# (name, hidden, intermediate, heads, kv heads, head dim, vocab, layers timed at decode)
MODELS = [
    ("smollm2-135m", 576, 1536, 9, 3, 64, 49152, 30),
    ("1b", 2048, 8192, 32, 8, 64, 128256, 8),  # Llama-3.2-1B's sizes; 16 layers really
]
DECODE_TOKENS, PREFILL_TOKENS = (1, 4, 8, 16), (64, 128, 512)
PATHS = ("kvrun AMX bf16", "kvrun vdpbf16ps bf16", "kvrun fp32", "torch bf16", "torch fp32")


def path_cases(
    model: tuple[str, int, int, int, int, int, int, int], kernels: dict[str, Any]
) -> list[tuple[str, int, float, dict[str, Callable[[], Any]]]]:
    """Per (what, tokens): its GFLOP and one callable per path in PATHS that has kernels.

    Decode-like batches run every projection of ``layers`` layers (weights from memory,
    as in a real step); prefill-like ones two layers (compute-bound). The lm_head alone
    at 1, 16 and 64 tokens (the rows that want logits)."""
    name, hidden, inter, heads, kv_heads, head_dim, vocab, layers = model
    g = torch.Generator().manual_seed(4)
    shapes = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim)]
    shapes += [(2 * inter, hidden), (hidden, inter)]
    amx, vdp = kernels.get("AMX_BF16"), kernels.get("AVX512_BF16")
    packer = amx or vdp  # one packing serves both: the same panels

    def weights(count: int, mats: list[tuple[int, int]]) -> dict[str, list[Any]]:
        plain = [0.02 * torch.randn(n, k, generator=g) for _ in range(count) for n, k in mats]
        out: dict[str, list[Any]] = {"fp32": plain, "bf16": [w.bfloat16() for w in plain]}
        if packer is not None:
            out["packed bf16"] = [packer.pack(w) for w in out["bf16"]]
            out["packed fp32"] = [packer.pack(w) for w in plain]
        return out

    def runners(ws: dict[str, list[Any]], tokens: int) -> dict[str, Callable[[], Any]]:
        xs32 = {k: torch.randn(tokens, k, generator=g) for k in {w.shape[1] for w in ws["fp32"]}}
        xs16 = {k: x.bfloat16() for k, x in xs32.items()}
        fns: dict[str, Callable[[], Any]] = {
            "torch bf16": lambda: [F.linear(xs16[w.shape[1]], w) for w in ws["bf16"]],
            "torch fp32": lambda: [F.linear(xs32[w.shape[1]], w) for w in ws["fp32"]],
        }
        for label, lib in (("kvrun AMX bf16", amx), ("kvrun vdpbf16ps bf16", vdp)):
            if lib is not None:
                fns[label] = functools.partial(
                    lambda lib: [lib.packed_linear(xs16[w.shape[1]], w) for w in ws["packed bf16"]],
                    lib,
                )
        if packer is not None:
            fns["kvrun fp32"] = lambda: [
                packer.packed_linear(xs32[w.shape[1]], w) for w in ws["packed fp32"]
            ]
        return fns

    cases = []
    flop_layer = 2 * sum(n * k for n, k in shapes)
    decode_ws = weights(layers, shapes)
    for tokens in DECODE_TOKENS:
        label = f"{name}: {layers} layers' projections"
        cases.append(
            (label, tokens, flop_layer * layers * tokens / 1e9, runners(decode_ws, tokens))
        )
    del decode_ws
    prefill_ws = weights(2, shapes)
    for tokens in PREFILL_TOKENS:
        label = f"{name}: 2 layers' projections"
        cases.append((label, tokens, flop_layer * 2 * tokens / 1e9, runners(prefill_ws, tokens)))
    head_ws = weights(1, [(vocab, hidden)])
    for tokens in (1, 16, 64):
        cases.append(
            (
                f"{name}: lm_head",
                tokens,
                2 * vocab * hidden * tokens / 1e9,
                runners(head_ws, tokens),
            )
        )
    return cases


def run_paths(runs: int, only: str, clock: Callable[[], float]) -> None:
    """The matmul paths' table (--paths): median ms and GFLOP/s per path."""
    kernels: dict[str, Any] = {}
    for isa in ("AMX_BF16", "AVX512_BF16"):
        native, why = load_native(Path(tempfile.mkdtemp()), torch.get_num_threads(), isa=isa)
        if native is not None and native.isa == isa:
            kernels[isa] = native
        else:
            print(f"(no {isa} path: {why})")
    print(
        "| shapes | tokens | "
        + " | ".join(f"{p} ms (GFLOP/s)" for p in PATHS)
        + " | AMX vs vdpbf16ps | AMX vs torch bf16 |"
    )
    print("|---|---:|" + "---:|" * (len(PATHS) + 2))
    for model in MODELS:
        if only not in model[0]:
            continue
        for label, tokens, gflop, fns in path_cases(model, kernels):
            times: dict[str, list[float]] = {p: [] for p in fns}
            for fn in fns.values():
                fn()  # warm: first touch, thread start
            for _ in range(runs):
                for p, fn in fns.items():
                    start = clock()
                    fn()
                    times[p].append(clock() - start)
            med = {p: statistics.median(t) for p, t in times.items()}
            cells = [
                f"{med[p] * 1e3:.2f} ({gflop / med[p]:.0f})" if p in med else "-" for p in PATHS
            ]
            amx, vdp, tb = (
                med.get(p) for p in ("kvrun AMX bf16", "kvrun vdpbf16ps bf16", "torch bf16")
            )
            ratio = f"{vdp / amx:.2f}x" if amx and vdp else "-"
            ratio_t = f"{tb / amx:.2f}x" if amx and tb else "-"
            print(
                f"| {label} | {tokens} | " + " | ".join(cells) + f" | {ratio} | {ratio_t} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timer", choices=sorted(TIMERS), default="wall")
    parser.add_argument("--only", default="", help="run only the ops whose name contains this")
    parser.add_argument("--paths", action="store_true", help="compare the matmul paths instead")
    args = parser.parse_args()
    clock = TIMERS[args.timer]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paths:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} runs")
        run_paths(args.runs, args.only, clock)
        return
    isa = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {isa}, {threads} threads, {args.runs} runs, {args.timer} time"
    )
    cpu = cpu_table()
    print("| op | tokens | reference µs | kvrun-cpu µs | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for tokens in (1, 64, 512):
        for name, (ref, mine) in cases(cpu, tokens).items():
            if args.only not in name:
                continue
            r, m = compare(args.runs, ref, mine, clock)
            print(f"| {name} | {tokens} | {r:.1f} | {m:.1f} | {r / m:.2f}x |")
    slow = {**attention_cases(cpu), **linear_cases(cpu), **moe_cases(cpu)}
    for name, (ref, mine) in slow.items():
        if args.only not in name:
            continue
        r, m = compare(max(5, args.runs // 20), ref, mine, clock)
        print(f"| {name} | | {r:.1f} | {m:.1f} | {r / m:.2f}x |")


if __name__ == "__main__":
    main()
