"""Turn a harness run (benchmarks/run.py's results.json) into the markdown tables.

    python benchmarks/report.py benchmarks/results/<stamp>/results.json

Standard library only. The roofline: single-stream fp32 decode reads every
weight once per token, so tokens/s <= read bandwidth / (4 * params); batched
generation does ~2 * params FLOPs per token, so tokens/s <= matmul FLOP/s / (2 * params).
"""

from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["agreement", "count_params", "machine_info", "render_report"]


def machine_info() -> dict[str, Any]:
    """nproc, CPU model and flags of interest, memory, kernel."""
    model, flags = "?", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
        mem_kib = next(
            int(ln.split()[1])
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem_kib = 0
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "simd": simd,
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "load_avg": os.getloadavg(),
        "gpus": _gpu_names(),
    }


def _gpu_names() -> list[str]:
    """The NVIDIA GPUs nvidia-smi lists (name, memory, driver); none without one."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def count_params(hf_dir: Path) -> int:
    """Parameters in the checkpoint's safetensors files, from their headers."""
    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for dim in meta["shape"]:
                    n *= dim
                total += n
    return total


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of identical sequences, mean fraction of tokens before the first mismatch)."""
    same, prefix = 0, 0.0
    for x, y in zip(a, b, strict=True):
        same += x == y
        n = next(
            (i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y))
        )
        prefix += n / max(len(x), 1)
    return same / len(a), prefix / len(a)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _versions(res: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in res.get("versions", {}).items())


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _shape(peers: dict[str, Any], prompts: int, new: int) -> tuple[int, int]:
    """(prompts, new tokens per prompt) of a workload, from the first peer with token ids;
    the defaults given where none has any."""
    ids = next((r["token_ids"] for r in peers.values() if r.get("token_ids")), None)
    return (len(ids), len(ids[0])) if ids else (prompts, new)


def render_report(report: dict[str, Any], hf_dir: Path, reference: str, baseline: str) -> str:
    m = report["machine"]
    params = count_params(hf_dir)
    out = [
        f"## Run {report['started']}",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']} ({', '.join(m['simd'])}), {m['mem_gib']} GiB, "
        f"Linux {m['kernel']}, load average at start {_fmt(m['load_avg'][0], 2)}"
        + (f"; GPU: {'; '.join(m['gpus'])}. " if m.get("gpus") else ". ")
        + f"Threads per peer: {report['args']['threads']}; repeats: {report['args']['repeats']} "
        f"(medians). Model: {params / 1e6:.1f} M parameters, fp32 unless noted.",
        "",
    ]
    single_bound = batched_bound = None
    if "roofline_inputs" in report:
        r = report["roofline_inputs"]
        single_bound = r["read_gb_s"] * 1e9 / (4 * params)
        batched_bound = r["fp32_matmul_gflop_s"] * 1e9 / (2 * params)
        out += [
            "### Machine and roofline",
            "",
            *_table(
                [
                    ["read bandwidth (torch sum, 512 MiB)", f"{r['read_gb_s']:.1f} GB/s"],
                    ["copy bandwidth (read + write)", f"{r['copy_gb_s']:.1f} GB/s"],
                    ["fp32 matmul (2048^3)", f"{r['fp32_matmul_gflop_s']:.1f} GFLOP/s"],
                    ["bf16 matmul (512^3)", f"{r['bf16_matmul_gflop_s']:.1f} GFLOP/s"],
                    ["torch CPU capability", r["cpu_capability"]],
                    ["fp32 bytes per decode step (4 x params)", f"{4 * params / 1e6:.0f} MB"],
                    [
                        "single-stream fp32 decode bound (BW / bytes)",
                        f"{single_bound:.1f} tokens/s",
                    ],
                    ["batched fp32 bound (FLOP/s / 2 x params)", f"{batched_bound:.0f} tokens/s"],
                ],
                ["quantity", f"measured ({r['threads']} threads)"],
            ),
            "",
        ]

    results = report["results"]
    for workload, peers in results.items():
        ref = peers.get(reference, {}).get("token_ids")
        base = peers.get(baseline, {}).get("median", {})
        key = "output_tok_s" if workload == "throughput" else "decode_tok_s"
        rows = []
        for name, res in peers.items():
            if "error" in res:
                rows.append(
                    [name, "FAILED: " + res["error"].splitlines()[0][:120]]
                    + ["-"] * (8 if workload == "latency" else 9)
                )
                continue
            med = res["median"]
            ratio = med[key] / base[key] if base else None
            match = "-"
            if ref is not None and name != reference:
                same, prefix = agreement(ref, res["token_ids"])
                match = f"{same:.0%} ({prefix:.0%} of tokens)"
            spread = (
                f"{min(r[key] for r in res['runs']):.1f}-{max(r[key] for r in res['runs']):.1f}"
            )
            note = ", ".join(
                x for x in [res.get("note", ""), res["config"].get("batching", "")] if x
            )
            load = "/".join(f"{x:.1f}" for x in res.get("load_avg", []))
            rss = _fmt(res.get("peak_rss_mib"), 0)  # absent in runs before it was measured
            if workload == "throughput":
                rows.append(
                    [
                        name,
                        _fmt(med["output_tok_s"]),
                        _fmt(med["total_tok_s"]),
                        spread,
                        _fmt(ratio, 2),
                        match,
                        rss,
                        load,
                        note,
                        _versions(res),
                    ]
                )
            else:
                pct = f"{med[key] / single_bound:.0%}" if single_bound else "-"
                rows.append(
                    [
                        name,
                        _fmt(med["ttft_s"] * 1e3),
                        _fmt(med[key]),
                        spread,
                        pct,
                        _fmt(ratio, 2),
                        match,
                        rss,
                        load,
                        _versions(res),
                    ]
                )
        out += [f"### {workload}", ""]
        if workload == "throughput":
            n, new = _shape(peers, 64, 128)
            out += [
                f"{n} chat prompts, {new} new tokens each (greedy, ignore_eos), all "
                "submitted at once. Peak RSS: the high-water resident set of the peer's "
                "process tree over loading, warm-up and every repeat (runners/common.py).",
                "",
            ]
            head = [
                "peer",
                "output tok/s",
                "total tok/s",
                "range (output)",
                f"x {baseline}",
                f"greedy = {reference}",
                "peak RSS MiB",
                "load before/after",
                "notes",
                "versions",
            ]
        else:
            new = _shape(peers, 1, 256)[1]
            out += [
                f"One chat prompt, {new} new tokens; TTFT = a 1-token generation; "
                f"decode = {new - 1} / (t({new}) - TTFT).",
                "",
            ]
            head = [
                "peer",
                "TTFT ms",
                "decode tok/s",
                "range (decode)",
                "of BW roofline",
                f"x {baseline}",
                f"greedy = {reference}",
                "peak RSS MiB",
                "load before/after",
                "versions",
            ]
        out += [*_table(rows, head), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/report.py RESULTS_JSON", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    print(
        render_report(
            report,
            Path(report["args"]["model"]),
            report["args"]["reference"],
            report["args"]["baseline"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
