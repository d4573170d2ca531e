"""Where kvrun's time goes on the throughput workload: cProfile of one LLM.generate.

    .venv/bin/python benchmarks/profile_throughput.py                 # float32
    .venv/bin/python benchmarks/profile_throughput.py --dtype bfloat16 --top 15

The workload is the harness's (benchmarks/run.py): the 64 throughput prompts of
benchmarks/prompts.json rendered with the checkpoint's chat template, 128 greedy
tokens each, ignore_eos, prefix caching off, after one untimed warm-up generation.
Prints the output rate, then the functions with the most time of their own
(cProfile's tottime): the fused decode step, the packed matmuls outside it (prefill
projections and the lm_head), prefill attention, and the Python around them.
Set OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND as the harness does (2 threads, 0-1).

``--split`` times the parts of every engine step instead of profiling (no cProfile
overhead): the fused decode step (decoder.c), the rest of the model runner (batch
building, prefill forwards, the lm_head), the sampler (argmax for greedy rows), and
the engine's Python around them (scheduler, detokenization, outputs); wall-clock
sums and shares of the timed generate.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from checkpoint import DEFAULT_OUT
from run import _render_prompts

from kvrun import LLM, SamplingParams


class PartTimer:
    """Wraps methods of the engine's parts to sum the wall-clock seconds spent in each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, method: str, part: str) -> None:
        inner = getattr(owner, method)
        self.seconds.setdefault(part, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(owner, method, timed)


def split_parts(llm: LLM) -> PartTimer:
    """Time the engine step, the runner, the fused decode step, the lm_head and the
    sampler of ``llm`` (a single-process cpu engine)."""
    engine = llm.llm_engine
    runner: Any = engine.runner
    timer = PartTimer()
    timer.wrap(engine, "step", "engine step")
    timer.wrap(runner, "execute", "model runner")
    if runner.fused_decoder is not None:
        timer.wrap(runner.fused_decoder, "run", "fused decode step")
    timer.wrap(runner.model, "compute_logits", "lm_head + float")
    timer.wrap(engine.sampling, "sample", "sampler")
    return timer


def print_split(timer: PartTimer, elapsed: float) -> None:
    s = timer.seconds
    rows = [
        ("fused decode step", s.get("fused decode step", 0.0)),
        ("lm_head + float", s["lm_head + float"]),
        (
            "rest of the runner (prefill, batch building)",
            s["model runner"] - s.get("fused decode step", 0.0) - s["lm_head + float"],
        ),
        ("sampler", s["sampler"]),
        ("engine Python (scheduler, outputs)", s["engine step"] - s["model runner"] - s["sampler"]),
        ("outside the engine step (LLM.generate)", elapsed - s["engine step"]),
    ]
    for name, seconds in rows:
        print(f"{name:46s} {seconds:7.2f} s  {100 * seconds / elapsed:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT, help="fp32 HF checkpoint")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=12, help="functions to list")
    parser.add_argument("--split", action="store_true", help="time the step's parts instead")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"no checkpoint at {args.model}; run: python benchmarks/checkpoint.py")
        return 1

    prompts = [{"prompt_token_ids": p} for p in _render_prompts(args.model)["throughput"]]
    llm = LLM(
        model=str(args.model), dtype=args.dtype, max_model_len=2048, enable_prefix_caching=False
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    if args.split:
        timer = split_parts(llm)
        start = time.perf_counter()
        llm.generate(prompts, greedy, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = len(prompts) * args.max_tokens
        print(f"{args.dtype}: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s")
        print_split(timer, elapsed)
        return 0

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm.generate(prompts, greedy, use_tqdm=False)
    profile.disable()
    elapsed = time.perf_counter() - start
    tokens = len(prompts) * args.max_tokens
    print(f"{args.dtype}: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
