"""Throughput of kvrun on the openvino platform against the cpu platform, same model.

    python plugins/openvino/benchmarks/bench_openvino.py --model DIR_OR_GGUF
    python plugins/openvino/benchmarks/bench_openvino.py --prompts 2 --tokens 4  # smoke

Each platform runs in its own subprocess (a fresh engine, OpenMP and OpenVINO
threads not shared), generates greedily for the same prompts with ignore_eos, and
reports one JSON line; this script prints a markdown table and whether the two
platforms produced the same tokens. Engine start-up (for openvino: IR export on the
first run, then compile; for both: LLMEngine.warm_up, as the server runs it) is timed
apart from generation. The default model is
kvrun's default (SmolLM2-135M-Instruct GGUF); --model takes a Hugging Face
directory too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

__all__ = ["main", "run_one"]

PLATFORMS = ("cpu", "openvino")
# Distinct questions so the prefix cache does not turn the workload into decode only.
TOPICS = ["the sea", "a city", "winter", "a cat", "music", "rivers", "a garden", "the moon"]


def _prompt_ids(tokenizer: Any, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})."
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        out.append(tokenizer.encode(chat, add_special_tokens=False))
    return out


def run_one(platform: str, model: str | None, prompts: int, tokens: int) -> dict[str, Any]:
    """Run in the child process: one engine on ``platform``, timed."""
    from kvrun.config import EngineArgs
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.envs import read_env
    from kvrun.sampling_params import SamplingParams

    env = read_env({**os.environ, "VLLM_TARGET_DEVICE": platform})
    start = time.perf_counter()
    engine = LLMEngine.from_args(EngineArgs(model=model, dtype="float32"), env)
    engine.warm_up()  # first-use costs belong to start-up, as `kvrun serve` does it
    ready = time.perf_counter()
    ids = _prompt_ids(engine.tokenizer, prompts)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    request_ids = [engine.new_request_id() for _ in ids]
    for rid, prompt in zip(request_ids, ids, strict=True):
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for seq in delta.sequences:
                outputs.setdefault(delta.request_id, []).extend(seq.token_ids)
    elapsed = time.perf_counter() - t0
    generated = sum(len(v) for v in outputs.values())
    return {
        "platform": platform,
        "startup_s": round(ready - start, 2),
        "generate_s": round(elapsed, 3),
        "prompt_tokens": sum(len(p) for p in ids),
        "generated_tokens": generated,
        "output_tok_per_s": round(generated / elapsed, 1),
        "tokens": [outputs[r] for r in request_ids],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: kvrun's default)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--platforms", default=",".join(PLATFORMS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.model, args.prompts, args.tokens)))
        return 0
    results = []
    for platform in args.platforms.split(","):
        cmd = [sys.executable, __file__, "--child", platform]
        cmd += ["--prompts", str(args.prompts), "--tokens", str(args.tokens)]
        if args.model:
            cmd += ["--model", args.model]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{platform} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.prompts} prompts x {args.tokens} new tokens, greedy, float32\n")
    print("| platform | start-up s | generate s | prompt tok | output tok | output tok/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['platform']} | {r['startup_s']} | {r['generate_s']} | {r['prompt_tokens']} "
            f"| {r['generated_tokens']} | {r['output_tok_per_s']} |"
        )
    if len(results) > 1:
        same = all(r["tokens"] == results[0]["tokens"] for r in results[1:])
        print(f"\ngreedy tokens identical across platforms: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
