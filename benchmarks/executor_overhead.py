"""The mp executor's overhead per decode step, against the in-process runner (issue 17).

Times decode steps of the default model (SmolLM2-135M-Instruct, or --model) with the
in-process runner (``distributed_executor_backend="uni"``) and through one worker
process (``"mp"`` at TP=1), everything else equal, and prints the median step time of
each and the mp overhead as a share of the uni step. The issue's target: under 10%.

    .venv/bin/python benchmarks/executor_overhead.py --steps 200 [--batch 1] [--model M]

Each backend runs in a fresh process of its own (this script re-runs itself with
--only), so that neither inherits the other's threads. Run it on a quiet machine: the
difference measured is a fraction of a millisecond.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

BACKENDS = ("uni", "mp")


def measure(
    backend: str, model: str | None, steps: int, batch: int, prompt_len: int
) -> dict[str, Any]:
    """Median, mean and p90 of ``steps`` decode-only engine steps of ``batch`` requests."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from kvrun import LLM, SamplingParams

    llm = LLM(model, distributed_executor_backend=backend, max_model_len=prompt_len + steps + 16)
    engine = llm.llm_engine
    engine.warm_up()
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % 1000 + 10 for j in range(prompt_len)]
        engine.add_request(f"bench-{i}", prompt, params)
    engine.step()  # the prefill (one step at these sizes)
    engine.step()  # the first decode pays first-use costs
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    runner: Any = engine.runner
    if hasattr(runner, "close"):
        runner.close()
    times.sort()
    return {
        "backend": backend,
        "median_ms": 1e3 * statistics.median(times),
        "mean_ms": 1e3 * statistics.fmean(times),
        "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
        "steps": steps,
        "batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per backend")
    parser.add_argument("--batch", type=int, default=1, help="requests decoding together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: kvrun's default model")
    parser.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    if args.only is not None:
        result = measure(args.only, args.model, args.steps, args.batch, args.prompt_len)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for backend in BACKENDS:
        command = [sys.executable, __file__, "--only", backend, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--prompt-len", str(args.prompt_len)]  # fmt: skip
        if args.model is not None:
            command += ["--model", args.model]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"the {backend} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        results[backend] = json.loads(lines[-1][len("RESULT ") :])
    uni, mp = results["uni"], results["mp"]
    print(f"decode steps of {args.steps}, batch {args.batch}, prompt {args.prompt_len} tokens")
    print(f"{'backend':8} {'median ms':>10} {'mean ms':>10} {'p90 ms':>10}")
    for r in (uni, mp):
        print(f"{r['backend']:8} {r['median_ms']:10.3f} {r['mean_ms']:10.3f} {r['p90_ms']:10.3f}")
    overhead = mp["median_ms"] - uni["median_ms"]
    share = 100 * overhead / uni["median_ms"]
    verdict = "within" if share < 10 else "over"
    print(
        f"mp overhead: {overhead:.3f} ms per step, {share:.1f}% of a uni step ({verdict} the 10% target)"
    )


if __name__ == "__main__":
    main()
