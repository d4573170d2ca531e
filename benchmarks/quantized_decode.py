"""Single-stream decode of a GGUF run as stored (``quantization="gguf"``): the fused
native decode step against the op-by-op quantized forward, in one process.

One engine; each repeat runs the same greedy generation with the fused decoder and with
``runner.fused_decoder = None`` (the op-by-op path, what every quantized model ran before
session 11), alternately. Prints decode tok/s (the steps after the first, wall time), the
process CPU time per decode token (both threads; a loaded machine inflates wall time far
more than CPU time), whether the two runs' tokens are equal, and the weight bytes a decode
token reads (the projections and the lm_head), for the roofline: those bytes over the
read bandwidth ``benchmarks/machine.py`` measures.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quantized_decode.py \\
        [--model FILE.gguf] [--tokens 128] [--repeats 5] [--dtype float32]

Without ``--model``: the default model (SmolLM2-135M-Instruct's Q4_1 GGUF).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.envs import read_env
from kvrun.loader.resolve import default_model
from kvrun.sampling_params import SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 2683, 253, 1341, 411]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    engine = LLMEngine.from_args(
        EngineArgs(
            model=args.model or default_model(),
            quantization="gguf",
            dtype=args.dtype,
            max_model_len=1024,
            enable_prefix_caching=False,
        ),
        read_env({**os.environ, "VLLM_TARGET_DEVICE": "cpu"}),
    )
    runner = engine.runner
    fused = runner.fused_decoder
    model = runner.model
    matrices = [getattr(lay, n) for lay in model.layers for n in ("qkv", "o", "gate_up", "down")]
    weight_bytes = sum(getattr(m, "nbytes", 0) for m in [*matrices, model.lm_head])
    print(f"fused decoder: {type(fused).__name__}, quantized: {getattr(fused, 'quantized', None)}")
    print(f"weight bytes per decode token: {weight_bytes / 1e6:.1f} MB")
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {"fused": [], "op-by-op": []}
    cpu_ms: dict[str, list[float]] = {"fused": [], "op-by-op": []}
    tokens: dict[str, list[int]] = {}
    for repeat in range(args.repeats):
        for name in ("fused", "op-by-op"):
            runner.fused_decoder = fused if name == "fused" else None
            engine.add_request(f"{name}-{repeat}", PROMPT, params)
            wall, cpu, out = [], [], []
            while engine.has_unfinished_requests():
                t, c = time.perf_counter(), time.process_time()
                for delta in engine.step():
                    for seq in delta.sequences:
                        out.extend(seq.token_ids)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            rates[name].append((args.tokens - 1) / sum(wall[1:]))
            cpu_ms[name].append(1e3 * sum(cpu[1:]) / (args.tokens - 1))
            tokens[name] = out
    for name in rates:
        print(
            f"{name}: decode {statistics.median(rates[name]):.1f} tok/s (median of "
            f"{', '.join(f'{r:.1f}' for r in rates[name])}); CPU "
            f"{statistics.median(cpu_ms[name]):.2f} ms per token"
        )
    print("same tokens:", tokens["fused"] == tokens["op-by-op"])


if __name__ == "__main__":
    main()
