"""TP=1 against TP=N on the GPUs of one machine: agreement and decode speed.

The GPU check's ``tp`` stage (benchmarks/gpu_check.sh) runs it where a session is lent
two or more GPUs. Each configuration runs in its own process (one engine at a time):

- float32, greedy, 8 prompts x 32 tokens with 5 logprobs: TP=N against TP=1, tokens
  equal until the first divergence and whether each divergence is a near-tie (TP=1's
  top-2 margin under 1e-3 nats), and the largest difference of the chosen tokens'
  logprobs before it. TP=N sums the row-parallel projections in another order; NCCL
  and the custom all-reduce each in their own.
- bf16 decode latency (batch 1 and 16, 128 tokens, median of 3): TP=1, TP=N with the
  custom all-reduce (cuda's peer-to-peer path, when the GPUs allow it) and TP=N with
  ``disable_custom_all_reduce=True`` (NCCL only).

    python benchmarks/tp_check.py --model DIR --tp 2 [--out report.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are",
    "SELECT name FROM users WHERE",
    "Water boils at",
    "import numpy as np\n",
    "The quick brown fox",
]
NEAR_TIE = 1e-3


def _one(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; what the parent compares."""
    from kvrun import LLM, SamplingParams

    llm = LLM(
        model=config["model"],
        dtype=config["dtype"],
        tensor_parallel_size=config["tp"],
        disable_custom_all_reduce=config["disable_custom"],
        enforce_eager=True,
        max_model_len=1024,
    )
    if config["kind"] == "agreement":
        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
        outs = llm.generate(PROMPTS, params)
        runs = []
        for out in outs:
            completion = out.outputs[0]
            steps = []
            for token, top in zip(completion.token_ids, completion.logprobs or [], strict=True):
                ranked = sorted(top.values(), key=lambda lp: -lp.logprob)
                margin = ranked[0].logprob - ranked[1].logprob if len(ranked) > 1 else 1e9
                steps.append({"token": token, "logprob": top[token].logprob, "margin": margin})
            runs.append(steps)
        return {"runs": runs}
    timings: dict[str, float] = {}
    for batch in (1, 16):
        params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            llm.generate(prompts, params)
            seconds.append(time.perf_counter() - start)
        timings[f"batch{batch}"] = statistics.median(seconds) / 128 * 1000  # ms per step
    return {"ms_per_step": timings}


def _spawn(config: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    # the ranks' log line naming the all-reduce they chose and why
    result["choice"] = [ln for ln in proc.stderr.splitlines() if "tensor-parallel all-reduce" in ln]
    return result


def _agreement(base: list[list[dict[str, Any]]], other: list[list[dict[str, Any]]]) -> str:
    equal = total = near_ties = divergences = 0
    worst = 0.0
    for a, b in zip(base, other, strict=True):
        for step_a, step_b in zip(a, b, strict=True):
            total += 1
            if step_a["token"] != step_b["token"]:
                divergences += 1
                near_ties += step_a["margin"] < NEAR_TIE
                break
            equal += 1
            worst = max(worst, abs(step_a["logprob"] - step_b["logprob"]))
    return (
        f"{equal}/{total} compared tokens equal before divergence; {divergences} of "
        f"{len(base)} prompts diverge ({near_ties} at a near-tie, margin < {NEAR_TIE}); "
        f"max |logprob difference| before divergence {worst:.2e}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(json.loads(args.one))))
        return 0
    common = {"model": args.model, "disable_custom": False}
    lines = [f"# TP=1 against TP={args.tp} ({args.model})", ""]
    base = _spawn({**common, "kind": "agreement", "dtype": "float32", "tp": 1})
    for label, disable in (("custom all-reduce", False), ("NCCL only", True)):
        other = _spawn(
            {**common, "kind": "agreement", "dtype": "float32", "tp": args.tp,
             "disable_custom": disable}
        )  # fmt: skip
        if "error" in base or "error" in other:
            lines.append(
                f"- float32 agreement, {label}: failed: {base.get('error') or other.get('error')}"
            )
            continue
        lines.append(
            f"- float32 agreement, TP={args.tp} {label}: "
            f"{_agreement(base['runs'], other['runs'])}; log: {' | '.join(other['choice'])}"
        )
    lines += ["", "| bf16 decode, ms per step | batch 1 | batch 16 |", "|---|---|---|"]
    for label, tp, disable in (
        ("TP=1", 1, False),
        (f"TP={args.tp}, custom all-reduce", args.tp, False),
        (f"TP={args.tp}, NCCL only", args.tp, True),
    ):
        got = _spawn(
            {**common, "kind": "speed", "dtype": "bfloat16", "tp": tp, "disable_custom": disable}
        )
        if "error" in got:
            lines.append(f"| {label} | failed: {got['error'].splitlines()[-1]} | |")
            continue
        ms = got["ms_per_step"]
        lines.append(f"| {label} | {ms['batch1']:.2f} | {ms['batch16']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
