"""Does a token late in a long generation cost what an early one does?

One request generates ``--tokens`` tokens (default 4096) with logprobs and a stop
string that never matches (so the text and logprob paths run on every step), on a
tiny random Llama with SmolLM2's tokenizer: the model's own per-token cost is small
and nearly flat, so what grows with the output is the engine's bookkeeping. Each
step is timed in two parts:

- engine: ``LLMEngine.step()`` (plus, where it returns deltas, the
  ``OutputAccumulator`` that ``LLM.generate`` feeds them to) minus the model call;
- server: turning the step's outputs into the frontend's wire message (the
  ``DeltaEncoder`` of cumulative outputs before deltas, ``to_wire`` after).

It prints one JSON line with the medians (microseconds per token) of the first and
the last ``--window`` tokens, and their ratio. The same script runs against an older
checkout (its engine's step returned cumulative RequestOutputs), for a before/after:

    python benchmarks/long_generation.py [--tokens 4096] [--window 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _model(out: Path) -> Path:
    from kvrun.testing.checkpoints import build_random_checkpoint, save_tokenizer_from_gguf

    tokenizer = save_tokenizer_from_gguf(None, out / "tokenizer")
    return build_random_checkpoint(
        "llama",
        out / "model",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=8192,
        tokenizer_dir=tokenizer,
    )


def _server_encoder() -> Any:
    """What the engine process does with one step's outputs for the frontend."""
    import kvrun.server.deltas as deltas

    if hasattr(deltas, "DeltaEncoder"):  # before: cumulative outputs, diffed here
        return deltas.DeltaEncoder().encode
    return deltas.to_wire


def _accumulator() -> Any:
    try:
        from kvrun.engine.output_accumulator import OutputAccumulator
    except ImportError:  # before: step() returned whole outputs itself
        return None
    return OutputAccumulator()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=100)
    args = parser.parse_args(argv)

    import torch

    from kvrun.config import EngineArgs
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.envs import read_env
    from kvrun.sampling_params import SamplingParams

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(Path(tmp))
        engine = getattr(LLMEngine, "from_args", LLMEngine)(  # before: LLMEngine(args, env)
            EngineArgs(model=str(model), dtype="float32", max_model_len=args.tokens + 64),
            read_env({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CACHE_ROOT": tmp}),
        )
        model_seconds: list[float] = []
        execute = engine.runner.execute

        def timed_execute(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return execute(*a, **kw)
            finally:
                model_seconds.append(time.perf_counter() - start)

        engine.runner.execute = timed_execute  # type: ignore[method-assign]
        encode = _server_encoder()
        accumulator = _accumulator()
        kwargs: dict[str, Any] = {}
        if accumulator is not None:
            from kvrun.outputs import RequestOutputKind

            kwargs["output_kind"] = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
        params = SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=args.tokens,
            ignore_eos=True,
            logprobs=5,
            stop=["\u2603 never \u2603"],
            **kwargs,
        )
        engine.add_request("long", [1, 2, 3, 4, 5, 6, 7, 8], params)
        engine_us: list[float] = []
        server_us: list[float] = []
        while engine.has_unfinished_requests():
            model_seconds.clear()
            start = time.perf_counter()
            outputs = engine.step()
            if accumulator is not None:
                for delta in outputs:
                    accumulator.add(delta)
            middle = time.perf_counter()
            for output in outputs:
                encode(output)
            end = time.perf_counter()
            if not any(True for _ in outputs):
                continue
            engine_us.append((middle - start - sum(model_seconds)) * 1e6)
            server_us.append((end - middle) * 1e6)
    w = args.window
    # The first step is the prefill: skip it.
    engine_first = statistics.median(engine_us[1 : w + 1])
    engine_last = statistics.median(engine_us[-w:])
    server_first = statistics.median(server_us[1 : w + 1])
    server_last = statistics.median(server_us[-w:])
    result = {
        "tokens": len(engine_us),
        "window": w,
        "engine_us_first": round(engine_first, 1),
        "engine_us_last": round(engine_last, 1),
        "engine_last_over_first": round(engine_last / engine_first, 3),
        "server_us_first": round(server_first, 1),
        "server_us_last": round(server_last, 1),
        "server_last_over_first": round(server_last / server_first, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
