"""`kvrun bench serve --request-rate R --duration S`: a soak at a constant arrival rate.

Requests arrive every 1/R seconds whatever the server's state (an open-loop load, as
real clients are), a share of them streamed, a share abandoned by their client at a
random moment (the stream closed mid-answer), for ``--duration`` seconds. Results are
reported per window of ``--window`` seconds, so drift shows: requests completed,
aborted and failed, latency and time-to-first-token percentiles, and, given
``--server-pid``, the resident memory of the server and each of its child processes
(the engine) at the window's end. A flat soak has flat windows.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SoakWindow", "process_tree_rss", "soak"]


@dataclass
class _Outcome:
    start: float  # seconds since the soak began
    status: str  # "ok", "aborted", "failed"
    latency: float | None = None  # seconds, for completed requests
    ttft: float | None = None  # seconds, streamed completed requests
    error: str | None = None


@dataclass
class SoakWindow:
    start_s: float
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99
    ttft_ms: dict[str, float] = field(default_factory=dict)  # p50, p99
    rss_mib: dict[str, float] = field(default_factory=dict)  # "pid name" -> MiB at the end

    def as_dict(self) -> dict[str, Any]:
        return {
            "start_s": self.start_s,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "rss_mib": self.rss_mib,
        }


def process_tree_rss(pid: int) -> dict[str, float]:
    """Resident MiB of ``pid`` and its descendants, from /proc ("pid name" -> MiB)."""
    out: dict[str, float] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        proc = Path(f"/proc/{current}")
        try:
            status = (proc / "status").read_text()
            children = [
                int(c)
                for task in (proc / "task").iterdir()
                for c in (task / "children").read_text().split()
            ]
        except OSError:  # gone meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kib = int(fields.get("VmRSS", "0 kB").split()[0])
        out[f"{current} {fields.get('Name', '?').strip()}"] = round(rss_kib / 1024, 1)
        todo.extend(children)
    return out


async def soak(
    args: argparse.Namespace,
    base: str,
    headers: dict[str, str],
    model: str,
    one: Any,  # bench_cmd._one: a streamed request and its timings
    client: Any,  # an httpx.AsyncClient
    prompts: tuple[str, ...],
) -> list[SoakWindow]:
    rng = random.Random(args.seed)
    outcomes: list[_Outcome] = []
    errors: set[str] = set()
    rss_samples: list[tuple[float, dict[str, float]]] = []
    began = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def request(i: int, at: float) -> None:
        prompt = prompts[i % len(prompts)]
        if args.unique_prompts:  # no two requests share every block: the KV pool is used
            prompt = f"Request {i}. {prompt}"
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": args.ignore_eos,
            "stream": rng.random() < args.stream_fraction,
        }
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        abandon = rng.random() < args.abort_fraction
        url = f"{base}/v1/completions"
        if abandon:  # the client goes away at a random moment of its request
            try:
                patience = rng.uniform(0.05, 2.0)
                result = await asyncio.wait_for(one(client, url, body, headers), patience)
            except TimeoutError:
                outcomes.append(_Outcome(at, "aborted"))
                return
        else:
            result = await one(client, url, body, headers)
        if result.ok:
            outcomes.append(_Outcome(at, "ok", result.latency, result.ttft))
        else:
            outcomes.append(_Outcome(at, "failed", error=result.error))
            errors.add(str(result.error))

    async def sample_rss() -> None:
        while True:
            rss_samples.append((time.perf_counter() - began, process_tree_rss(args.server_pid)))
            await asyncio.sleep(min(args.window, 10.0))

    sampler = asyncio.ensure_future(sample_rss()) if args.server_pid else None
    interval = 1.0 / args.request_rate
    i = 0
    while (now := time.perf_counter() - began) < args.duration:
        task = asyncio.ensure_future(request(i, now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(max(0.0, began + i * interval - time.perf_counter()))
    if tasks:
        await asyncio.wait(tasks, timeout=args.timeout)
    if sampler is not None:
        sampler.cancel()
        rss_samples.append((time.perf_counter() - began, process_tree_rss(args.server_pid)))
    for error in sorted(errors)[:10]:
        print(f"error: {error}", file=sys.stderr)
    return _windows(outcomes, rss_samples, args.window, args.duration)


def _windows(
    outcomes: list[_Outcome],
    rss: list[tuple[float, dict[str, float]]],
    width: float,
    duration: float,
) -> list[SoakWindow]:
    from kvrun.cli.bench_cmd import percentile

    windows = []
    start = 0.0
    while start < duration:
        end = start + width
        window = SoakWindow(start_s=start)
        mine = [o for o in outcomes if start <= o.start < end]
        window.completed = sum(o.status == "ok" for o in mine)
        window.aborted = sum(o.status == "aborted" for o in mine)
        window.failed = sum(o.status == "failed" for o in mine)
        latencies = [o.latency for o in mine if o.latency is not None]
        ttfts = [o.ttft for o in mine if o.ttft is not None]
        window.latency_ms = {q: percentile(latencies, v) * 1000 for q, v in _QS}
        window.ttft_ms = {q: percentile(ttfts, v) * 1000 for q, v in _QS}
        inside = [sample for t, sample in rss if t <= end]
        window.rss_mib = inside[-1] if inside else {}
        windows.append(window)
        start = end
    return windows


_QS = (("p50", 50.0), ("p99", 99.0))
