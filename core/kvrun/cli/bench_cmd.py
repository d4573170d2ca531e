"""`kvrun bench serve`: drive a running server with concurrent streaming clients.

Reports request throughput, output tokens/s, and time-to-first-token and
inter-token latency percentiles over a fixed prompt set, so two servers given the
same flags face the same workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROMPTS", "BenchResult", "add_arguments", "percentile", "run"]

# The fixed workload: varied lengths and topics, cycled in order.
PROMPTS = (
    "Explain how a hash table handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation? Answer in a paragraph.",
    "Describe the water cycle to a ten-year-old.",
    "List five tips for writing readable Python code.",
    "Summarise the plot of a detective story you invent, in three sentences.",
    "Why is the sky blue?",
    "Give a recipe for a simple tomato soup.",
    "Compare trains and planes for a 500 km journey.",
    "What does a compiler do, step by step?",
    "Tell me a fact about octopuses and explain why it matters.",
    "How do vaccines train the immune system?",
    "Write a friendly email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Describe a city in the year 2100.",
    "How does public-key cryptography let strangers share a secret?",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_target", metavar="TARGET")
    sub.required = True
    serve = sub.add_parser("serve", help="benchmark an OpenAI-compatible server over HTTP")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--model", default=None, help="model name (default: the server's first)")
    serve.add_argument("--api-key", default=None, help="bearer key (default: VLLM_API_KEY)")
    serve.add_argument("--concurrency", type=int, default=4, help="clients streaming at once")
    serve.add_argument("--num-prompts", type=int, default=32, help="requests in total")
    serve.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    serve.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly max-tokens per request (vLLM's extension; default on)",
    )
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    soak = serve.add_argument_group(
        "soak", "a constant arrival rate for a duration, reported per window (kvrun.cli.soak)"
    )
    soak.add_argument("--request-rate", type=float, default=None, help="requests per second")
    soak.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals")
    soak.add_argument("--window", type=float, default=300.0, help="seconds per report window")
    soak.add_argument("--stream-fraction", type=float, default=0.5, help="share streamed")
    soak.add_argument(
        "--abort-fraction", type=float, default=0.05, help="share the client abandons"
    )
    soak.add_argument("--server-pid", type=int, default=None, help="report this process tree's RSS")
    soak.add_argument("--seed", type=int, default=0, help="for the streamed/abandoned choice")
    soak.add_argument(
        "--unique-prompts",
        action="store_true",
        help="start each prompt with its request number (else the 16 prompts repeat, and "
        "the prefix cache serves repeats from the same KV blocks)",
    )
    serve.add_argument("--json", action="store_true", help="print the results as JSON")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class _One:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency: float = 0.0


@dataclass(frozen=True)
class BenchResult:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # requests/s
    output_throughput: float  # output tokens/s
    total_output_tokens: int
    ttft_ms: dict[str, float]  # mean, p50, p99
    itl_ms: dict[str, float]  # mean, p50, p99
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_output_tokens": self.total_output_tokens,
            "ttft_ms": self.ttft_ms,
            "itl_ms": self.itl_ms,
            "errors": self.errors,
        }


def _summary(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    ms = 1000.0
    return {
        "mean": mean * ms,
        "p50": percentile(values, 50) * ms,
        "p99": percentile(values, 99) * ms,
    }


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> _One:
    result = _One()
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"]["completion_tokens"])
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.ok = True
    except Exception as exc:  # a failed request is counted, not fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    return result


async def _model_name(client: Any, base: str, headers: dict[str, str]) -> str:
    response = await client.get(f"{base}/v1/models", headers=headers)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def bench(args: argparse.Namespace, api_key: str | None) -> BenchResult:
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 1)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = args.model or await _model_name(client, base, headers)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.num_prompts):
            queue.put_nowait(i)
        results: list[_One] = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {
                    "model": model,
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": args.max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": args.ignore_eos,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                results.append(await _one(client, f"{base}/v1/completions", body, headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    return BenchResult(
        completed=len(good),
        failed=len(results) - len(good),
        duration_s=duration,
        request_throughput=len(good) / duration,
        output_throughput=tokens / duration,
        total_output_tokens=tokens,
        ttft_ms=_summary([r.ttft for r in good if r.ttft is not None]),
        itl_ms=_summary([x for r in good for x in r.itls]),
        errors=sorted({r.error for r in results if r.error is not None})[:10],
    )


def _print(result: BenchResult, args: argparse.Namespace) -> None:
    lines = [
        f"workload: {args.num_prompts} requests, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, against {args.base_url}",
        f"completed / failed:      {result.completed} / {result.failed}",
        f"duration:                {result.duration_s:.2f} s",
        f"request throughput:      {result.request_throughput:.3f} req/s",
        f"output token throughput: {result.output_throughput:.2f} tok/s",
        f"TTFT ms mean/p50/p99:    {result.ttft_ms['mean']:.1f} / {result.ttft_ms['p50']:.1f} / "
        f"{result.ttft_ms['p99']:.1f}",
        f"ITL ms mean/p50/p99:     {result.itl_ms['mean']:.1f} / {result.itl_ms['p50']:.1f} / "
        f"{result.itl_ms['p99']:.1f}",
    ]
    lines += [f"error: {e}" for e in result.errors]
    print("\n".join(lines))


async def _soak(args: argparse.Namespace, api_key: str | None) -> list[Any]:
    import httpx

    from kvrun.cli.soak import soak

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        model = args.model or await _model_name(client, base, headers)
        return await soak(args, base, headers, model, _one, client, PROMPTS)


def _print_soak(windows: list[Any], args: argparse.Namespace) -> None:
    print(
        f"soak: {args.request_rate:g} req/s for {args.duration:g} s, "
        f"{args.stream_fraction:.0%} streamed, {args.abort_fraction:.0%} abandoned, "
        f"max_tokens {args.max_tokens}, against {args.base_url}"
    )
    print("window s | done | aborted | failed | latency p50/p99 ms | TTFT p50/p99 ms | RSS MiB")
    for w in windows:
        rss = ", ".join(f"{k}: {v:.0f}" for k, v in w.rss_mib.items()) or "-"
        print(
            f"{w.start_s:>8.0f} | {w.completed:>4} | {w.aborted:>7} | {w.failed:>6} | "
            f"{w.latency_ms['p50']:.0f} / {w.latency_ms['p99']:.0f} | "
            f"{w.ttft_ms['p50']:.0f} / {w.ttft_ms['p99']:.0f} | {rss}"
        )


def run(args: argparse.Namespace, env: Any) -> int:
    from kvrun.errors import ConfigError

    for name in ("concurrency", "num_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    api_key = args.api_key if args.api_key is not None else env.VLLM_API_KEY
    if args.request_rate is not None:
        for name in ("request_rate", "duration", "window"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("stream_fraction", "abort_fraction"):
            if not 0 <= getattr(args, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]")
        windows = asyncio.run(_soak(args, api_key))
        if args.json:
            json.dump([w.as_dict() for w in windows], sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            _print_soak(windows, args)
        return 0 if all(w.failed == 0 for w in windows) else 1
    result = asyncio.run(bench(args, api_key))
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print(result, args)
    return 0 if result.failed == 0 else 1
