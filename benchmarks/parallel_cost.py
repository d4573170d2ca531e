"""What TP=2 and PP=2 cost against TP=1 on one machine (issue 17's benchmark).

SmolLM2-135M has 9 query heads, which two ranks cannot split, so the model here is
SmolLM2-135M's shape with 8 heads of 72 (hidden 576, 4 KV heads, 30 layers,
intermediate 1536, its 49,152-token vocabulary, tied embeddings) and random weights:
speed depends on the shapes, not the values. Each configuration runs in a fresh process
inside a network namespace of its own (``unshare -n``: gloo would otherwise pick the
machine's outward address), repeats interleaved, medians reported:

- latency: one request, a 32-token prompt, 64 greedy tokens: ms per decode step;
- throughput: 32 requests of 32-token prompts x 64 greedy tokens (ignore_eos): tokens/s.

Every configuration gets the machine's cores in all: TP=1 runs 2 threads in one
process; TP=2 and PP=2 run two ranks of 1 thread (the executor splits the cores).
PP=2 keeps two batches in flight (one per stage: 16 requests each in the throughput
run); "PP=2 one batch" is the same engine driven one step at a time (the executor told
to accept one batch, as before batches in flight), to show what the overlap buys.
Bytes moved per token come from kvrun.distributed.capacity (the formulas the capacity
plan in docs/distributed.md uses) at float32: the all-reduces' ring traffic per rank
for TP, the residual stream across the stage boundary for PP.

    python benchmarks/parallel_cost.py --repeats 3 [--out report.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_layers": 30,
    "num_heads": 8,
    "num_kv_heads": 4,
    "head_dim": 72,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 2048,
}
# label: (tensor_parallel_size, pipeline_parallel_size, one batch at a time)
CONFIGS = {
    "TP=1": (1, 1, False),
    "TP=2": (2, 1, False),
    "PP=2": (1, 2, False),
    "PP=2 one batch": (1, 2, True),
}
PROMPT_TOKENS = 32
NEW_TOKENS = 64
BATCH = 32


def _measure(model: str, tp: int, pp: int, one_batch: bool = False) -> dict[str, float]:
    from kvrun import LLM, SamplingParams

    if one_batch:  # the executor accepts one batch: the engine takes one step at a time
        from kvrun.executor.mp import MultiprocExecutor

        start_workers = MultiprocExecutor.__init__

        def one_at_a_time(self: Any, *args: Any, **kwargs: Any) -> None:
            start_workers(self, *args, **kwargs)
            self.max_concurrent_batches = 1

        MultiprocExecutor.__init__ = one_at_a_time  # type: ignore[method-assign]

    llm = LLM(
        model=model,
        dtype="float32",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=512,
    )
    prompts: list[Any] = [
        {"prompt_token_ids": [(7 * i + j) % 40000 + 100 for j in range(PROMPT_TOKENS)]}
        for i in range(BATCH)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts[:1], params)
    single = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, params)
    batch = time.perf_counter() - start
    return {
        "ms_per_step": (single - prefill) / (NEW_TOKENS - 1) * 1000,
        "tokens_per_s": BATCH * NEW_TOKENS / batch,
    }


def _bytes_per_token(tp: int, pp: int) -> str:
    from kvrun.distributed.capacity import (
        ModelShape,
        allreduce_bytes_per_token,
        pipeline_bytes_per_token,
    )

    shape = ModelShape(
        num_layers=SHAPE["num_layers"],
        hidden_size=SHAPE["hidden_size"],
        num_heads=SHAPE["num_heads"],
        num_kv_heads=SHAPE["num_kv_heads"],
        head_dim=SHAPE["head_dim"],
        intermediate_size=SHAPE["intermediate_size"],
        vocab_size=49152,
        tied_embeddings=True,
    )
    if tp > 1:
        return f"{allreduce_bytes_per_token(shape, tp, act_bytes=4) / 1024:.0f} KiB all-reduce"
    if pp > 1:
        return f"{pipeline_bytes_per_token(shape, act_bytes=4) / 1024:.1f} KiB send/recv"
    return "0"


def _run_one(model: str, label: str) -> dict[str, Any]:
    tp, pp, one_batch = CONFIGS[label]
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
        "import parallel_cost as p; "
        f"print(json.dumps(p._measure({model!r}, {tp}, {pp}, {one_batch})))"
    )
    inner = f"ip link set lo up && exec {sys.executable} -c {json.dumps(code)}"
    command = ["unshare", "-n", "sh", "-c", inner] if shutil.which("unshare") else [
        sys.executable, "-c", code,
    ]  # fmt: skip
    load = os.getloadavg()[0]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from kvrun.testing.checkpoints import build_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = str(
            build_random_checkpoint(
                "llama",
                Path(tmp) / "model",
                **{k: v for k, v in SHAPE.items() if k != "tie_word_embeddings"},
                tie_word_embeddings=True,
            )
        )
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in CONFIGS}
        for _ in range(args.repeats):  # interleaved: every configuration once per round
            for label in CONFIGS:
                runs[label].append(_run_one(model, label))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")),
        "unknown",
    )  # fmt: skip
    base = {
        k: statistics.median(r[k] for r in runs["TP=1"]) for k in ("ms_per_step", "tokens_per_s")
    }
    lines = [
        f"# TP=2 and PP=2 against TP=1 ({cpu}, {os.cpu_count()} cores; float32; "
        f"median of {args.repeats}, interleaved)",
        "",
        "| config | decode ms/step (batch 1) | vs TP=1 | throughput tok/s (32 x 64) | vs TP=1 "
        "| bytes moved per token | load avg at start |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (tp, pp, _) in CONFIGS.items():
        ms = statistics.median(r["ms_per_step"] for r in runs[label])
        tps = statistics.median(r["tokens_per_s"] for r in runs[label])
        loads = ", ".join(f"{r['load']:.1f}" for r in runs[label])
        lines.append(
            f"| {label} | {ms:.2f} | {ms / base['ms_per_step']:.2f}x | {tps:.0f} | "
            f"{tps / base['tokens_per_s']:.2f}x | {_bytes_per_token(tp, pp)} | {loads} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
