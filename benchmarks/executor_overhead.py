"""The executors' overhead per decode step at TP=1, against the in-process runner (issue 17).

Times decode steps of the default model (SmolLM2-135M-Instruct, or --model) with the
in-process runner (``distributed_executor_backend="uni"``), through one worker process
(``"mp"``), through one worker process whose logits come back through its reply pipe
as bytes (``"mp-pipe"``: the mp executor without its shared-memory result area, as it
was before the area), through one Ray actor (``"ray"``, a local cluster kvrun starts; the actor is on the
engine's node, so its steps and logits take the node-local shared-memory path of
:mod:`kvrun.executor.ray_local`), through one Ray actor by an actor call per step
(``"ray-calls"``: the ray executor as it was before that path, as ranks on other
nodes still get their steps) and through one Ray actor driven by a compiled graph
(``"ray-cgraph"``: VLLM_USE_RAY_COMPILED_DAG=1), everything else equal. Besides wall
time it records the CPU time per step of the engine's process and its workers or
actors, and of the run's other processes (Ray's daemons). It prints, per batch size, the
median over repeats of each run's median step time and each executor's overhead as a
share of the uni step. The issue's target: under 10%.

    .venv/bin/python benchmarks/executor_overhead.py --steps 200 --batch 1 16 --repeats 3

Each run is a fresh process of its own (this script re-runs itself with --only), so that
no backend inherits another's threads, inside a network namespace of its own whose only
interface is loopback (``unshare -n``, as root: Ray and gloo would otherwise use the
machine's outward address). Repeats are interleaved (every backend once, then again),
and the load average is recorded before each run: the difference measured is a fraction
of a millisecond, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKENDS = ("uni", "mp", "mp-pipe", "ray", "ray-calls", "ray-cgraph")
REPO = Path(__file__).resolve().parents[1]


def measure(
    backend: str, model: str | None, steps: int, batch: int, prompt_len: int
) -> dict[str, Any]:
    """Median, mean and p90 of ``steps`` decode-only engine steps of ``batch`` requests."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if backend == "ray-cgraph":
        os.environ["VLLM_USE_RAY_COMPILED_DAG"] = "1"
    if backend == "mp-pipe":  # the mp executor as it was: no result area
        import dataclasses

        from kvrun.executor import build

        settings_of = build._mp_settings

        def without_area(*args: Any) -> Any:
            return dataclasses.replace(settings_of(*args), result_area_bytes=0)

        build._mp_settings = without_area  # type: ignore[assignment]
    if backend == "ray-calls":  # the ray executor as it was: an actor call per step
        import dataclasses

        from kvrun.executor import build

        ray_settings_of = build._ray_settings

        def by_calls(*args: Any) -> Any:
            return dataclasses.replace(ray_settings_of(*args), node_local=False)

        build._ray_settings = by_calls  # type: ignore[assignment]
    from kvrun import LLM, SamplingParams

    llm = LLM(
        model,
        distributed_executor_backend=backend.split("-")[0],
        max_model_len=prompt_len + steps + 16,
    )
    engine = llm.llm_engine
    engine.warm_up()
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % 1000 + 10 for j in range(prompt_len)]
        engine.add_request(f"bench-{i}", prompt, params)
    engine.step()  # the prefill (one step at these sizes)
    engine.step()  # the first decode pays first-use costs
    runner: Any = engine.runner
    workers = list(getattr(runner, "pids", []))  # mp: its worker processes; ray: its actors
    # ray: Ray's own processes (raylet, GCS, ...): every other process in this run's
    # network namespace
    daemons = [p for p in _namespace_pids() if p not in workers] if backend != "uni" else []
    daemons_before = sum(_process_cpu_s(p) for p in daemons)
    cpu_before = time.process_time() + sum(_process_cpu_s(p) for p in workers)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    cpu_after = time.process_time() + sum(_process_cpu_s(p) for p in workers)
    daemons_after = sum(_process_cpu_s(p) for p in daemons)
    if hasattr(runner, "close"):
        runner.close()
    times.sort()
    return {
        "backend": backend,
        "median_ms": 1e3 * statistics.median(times),
        "mean_ms": 1e3 * statistics.fmean(times),
        "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))],
        # CPU time (user + system) of the engine's process and its mp workers per step:
        # what the step costs in work, which load on the machine barely changes
        "cpu_ms": 1e3 * (cpu_after - cpu_before) / steps,
        # CPU per step of the other processes of the run (Ray's daemons; mp: none)
        "daemons_cpu_ms": 1e3 * (daemons_after - daemons_before) / steps,
        "local_ranks": list(getattr(runner, "local_ranks", [])),
        "steps": steps,
        "batch": batch,
    }


def result_path_cost(batch: int, vocab: int, steps: int) -> dict[str, float]:
    """CPU time (user + system, every thread of this process) per step of moving a
    ``batch x vocab`` float32 logits result from a driver to an executor, both ways the
    mp executor has: as bytes in the reply (pack, encode, the pipe, decode, unpack) and
    through the result area (one copy in, a small header through the pipe, a view out).
    The driver side runs in a thread of this process, in lockstep with the reader (an
    acknowledgement pipe), so both sides' CPU time is counted; CPU time, unlike wall
    time, barely moves when other processes load the machine."""
    import fcntl
    import threading
    from multiprocessing.connection import Connection

    import torch

    from kvrun.engine.batch import StepLogits
    from kvrun.executor import messages as m
    from kvrun.executor.result_area import ResultArea, ResultAreaWriter

    torch.manual_seed(0)
    out = StepLogits(torch.randn(batch, vocab), [f"r{i}" for i in range(batch)], {})
    area = ResultArea(batch * vocab * 4)
    writer = ResultAreaWriter(os.dup(area.fd))

    def run(use_area: bool) -> float:
        reply_r, reply_w = os.pipe()
        ack_r, ack_w = os.pipe()
        fcntl.fcntl(reply_w, fcntl.F_SETPIPE_SZ, 1 << 20)
        replies, acks = Connection(reply_r, writable=False), Connection(ack_r, writable=False)
        reply_out, ack_out = Connection(reply_w, readable=False), Connection(ack_w, readable=False)

        def driver() -> None:
            for step in range(steps + 5):
                if use_area:
                    writer.start_step()
                    message = m.pack_step_logits(out, writer.place)
                else:
                    message = m.pack_step_logits(out)
                reply_out.send_bytes(m.encode(m.StepResult(step, message)))
                acks.recv_bytes()

        thread = threading.Thread(target=driver)
        thread.start()
        started = 0.0
        for step in range(steps + 5):
            if step == 5:  # the first steps warm up
                started = time.process_time()
            reply = m.decode_reply(replies.recv_bytes())
            assert isinstance(reply, m.StepResult)
            got = m.unpack_step_logits(reply.logits, area.tensor if use_area else None)
            assert got.logits.shape == (batch, vocab)
            ack_out.send_bytes(b"1")
        spent = time.process_time() - started
        thread.join()
        for conn in (replies, acks, reply_out, ack_out):
            conn.close()
        return 1e3 * spent / steps

    result = {"pipe_ms": run(False), "area_ms": run(True)}
    writer.close()
    area.close()
    return result


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread; 0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _namespace_pids() -> list[int]:
    """The processes in this process's network namespace but this one (the run has a
    namespace of its own: its engine's helpers, actors and Ray's daemons)."""
    mine = os.readlink("/proc/self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.readlink(f"{entry}/ns/net") == mine:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


def run_one(backend: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process in its own loopback-only network namespace."""
    inner = [sys.executable, str(Path(__file__).resolve()), "--only", backend,
             "--steps", str(args.steps), "--batch", str(batch),
             "--prompt-len", str(args.prompt_len)]  # fmt: skip
    if args.model is not None:
        inner += ["--model", args.model]
    tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",  # a token of this run, not one written to ~/.ray
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TMPDIR": tmpdir,
    }
    env.pop("RAY_ADDRESS", None)
    command = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + shlex.join(inner)]
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, check=False
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the {backend} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per run")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1], help="requests decoding together"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each backend")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: kvrun's default model")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument(
        "--result-path",
        action="store_true",
        help="only the CPU cost of the logits' way back, pipe vs result area (no model)",
    )
    parser.add_argument("--vocab", type=int, default=49152, help="for --result-path")
    parser.add_argument("--only", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.result_path:
        print(f"CPU ms per step to return [batch, {args.vocab}] float32 logits, {args.steps} steps")
        for batch in args.batch:
            cost = result_path_cost(batch, args.vocab, args.steps)
            print(
                f"batch {batch:3d}: through the pipe {cost['pipe_ms']:.3f} ms, through the "
                f"result area {cost['area_ms']:.3f} ms (load {load_average()})"
            )
        return
    if args.steps < 1 or min(args.batch) < 1 or args.repeats < 1:
        parser.error("--steps, --batch and --repeats must be >= 1")
    if args.only is not None:
        result = measure(args.only, args.model, args.steps, args.batch[0], args.prompt_len)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if "uni" not in args.backends:
        args.backends.insert(0, "uni")
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for batch in args.batch:
            for backend in args.backends:
                load = load_average()
                result = run_one(backend, batch, args)
                result.update(repeat=repeat, load_before=load, load_after=load_average())
                runs.append(result)
                cpu = f", CPU {result['cpu_ms']:7.2f} ms"
                if result.get("daemons_cpu_ms"):
                    cpu += f" + daemons {result['daemons_cpu_ms']:6.2f} ms"
                print(
                    f"  repeat {repeat} batch {batch:3d} {backend:10} "
                    f"median {result['median_ms']:8.3f} ms{cpu}  (load {load} -> "
                    f"{result['load_after']})",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    print(f"\ndecode steps: {args.steps} per run, {args.repeats} runs each, interleaved; "
          f"prompt {args.prompt_len} tokens; medians of the runs' medians")  # fmt: skip
    print(f"{'batch':>5} {'backend':10} {'median ms':>10} {'runs':>28} {'overhead':>18}")
    for batch in args.batch:
        mine = [r for r in runs if r["batch"] == batch]
        medians = {b: [r["median_ms"] for r in mine if r["backend"] == b] for b in args.backends}
        uni = statistics.median(medians["uni"])
        for backend in args.backends:
            value = statistics.median(medians[backend])
            spread = ", ".join(f"{m:.2f}" for m in medians[backend])
            extra = ""
            if backend != "uni":
                share = 100 * (value - uni) / uni
                extra = f"{value - uni:+.2f} ms, {share:+.1f}%"
            cpus = [r["cpu_ms"] for r in mine if r["backend"] == backend and r["cpu_ms"]]
            cpu = f"  CPU {statistics.median(cpus):.2f} ms/step" if cpus else ""
            print(f"{batch:5d} {backend:10} {value:10.3f} {spread:>28} {extra:>18}{cpu}")


if __name__ == "__main__":
    main()
