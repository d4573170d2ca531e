"""kvrun's quantized greedy output against llama.cpp's on the same GGUF file.

Both run the file as stored (kvrun: ``quantization="gguf"``, int8 activations per
block of 32 as llama.cpp's CPU kernels; llama.cpp: its own kernels), on the same token
ids (the chat prompts below, tokenized once by kvrun), greedy, ``ignore_eos``. Their
arithmetic still differs (summation order, attention, the lm_head's activations), so
the result is an agreement, not an equality: per prompt, how many tokens agree before
the first divergence, and the top-2 margin (nats) of each side's logits there, which
shows whether the divergence is a near-tie. One JSON line per prompt, then a summary.

llama-cpp-python lives in its own virtualenv (``bash benchmarks/setup_peers.sh
llamacpp`` builds it from source, ~10 minutes), without kvrun. Run this script with
kvrun's python; it runs llama.cpp either in-process (when ``llama_cpp`` imports) or in
the given interpreter (this same file, ``--llamacpp-only``, reading the token ids as
JSON on stdin):

    .venv/bin/python benchmarks/quantized_agreement.py \\
        --llamacpp-python benchmarks/.venvs/llamacpp/bin/python [--model FILE.gguf] \\
        [--tokens 64] [--threads 2]

Without ``--model``: the default model (the Q4_1 GGUF of SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Explain recursion to a five-year-old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "What does a CPU cache do?",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23?",
    "Name a famous painting by Vincent van Gogh.",
    "How do vaccines work?",
    "Write a limerick about a cat who codes.",
    "What are the three states of matter?",
    "Describe a sunset using only five words.",
    "def fib(n):\n    # complete this Python function",
]


def llamacpp_greedy(
    model: str, prompts: list[list[int]], tokens: int, threads: int
) -> list[dict[str, Any]]:
    """llama.cpp's greedy continuation of each prompt (argmax, first index on ties),
    with the top-2 margin of its logprobs at every step."""
    import llama_cpp  # type: ignore[import-not-found]  # only in its own venv
    import numpy as np

    longest = max(len(p) for p in prompts) + tokens
    # the runner's AMX work-around (its docstring says why), applied to what Llama() loads
    sys.path.insert(0, str(Path(__file__).resolve().parent / "runners"))
    from llamacpp_runner import without_amx_repack  # type: ignore[import-not-found]

    low_level = llama_cpp.llama_cpp
    default_params = low_level.llama_model_default_params

    def model_params() -> Any:
        params = default_params()
        without_amx_repack(low_level, params)
        return params

    low_level.llama_model_default_params = model_params
    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=longest,
        n_threads=threads,
        n_batch=512,
        logits_all=True,  # llama.scores holds logits only then (llama-cpp-python >= 0.3)
        # float32 KV cache as kvrun's (llama.cpp's default is f16): the agreement then
        # measures the weight formats' arithmetic, not a cache rounding kvrun does not do
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        verbose=False,
    )
    results = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        out, margins = [], []
        for _ in range(tokens):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            token = int(np.argmax(logits))
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]))  # logit gap = logprob gap
            out.append(token)
            llm.eval([token])
        results.append({"tokens": out, "margins": margins})
    return results


def kvrun_greedy(model: str, tokens: int) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """The prompts' token ids and kvrun's quantized greedy continuation, with the top-2
    margin of its logprobs at every step."""
    from kvrun import LLM, SamplingParams

    llm = LLM(model, quantization="gguf", dtype="float32", max_model_len=1024)
    tokenizer = llm.get_tokenizer()
    prompts = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    results = []
    for output in outputs:
        seq = output.outputs[0]
        margins = []
        for entry in seq.logprobs or []:
            ranked = sorted(entry.values(), key=lambda lp: lp.rank or 0)
            margins.append(ranked[0].logprob - ranked[1].logprob if len(ranked) > 1 else math.inf)
        results.append({"tokens": list(seq.token_ids), "margins": margins})
    return prompts, results


def compare(kv: list[dict[str, Any]], cpp: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    rows = []
    for i, (a, b) in enumerate(zip(kv, cpp, strict=True)):
        step = next(
            (s for s, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True)) if x != y),
            None,
        )
        row: dict[str, Any] = {"prompt": i, "agreed_tokens": tokens if step is None else step}
        if step is not None:
            row["kvrun_top2_margin"] = round(a["margins"][step], 4)
            row["llamacpp_top2_margin"] = round(b["margins"][step], 4)
        rows.append(row)
        print(json.dumps(row))
    agreed = [r["agreed_tokens"] for r in rows]
    margins = [
        min(r["kvrun_top2_margin"], r["llamacpp_top2_margin"])
        for r in rows
        if "kvrun_top2_margin" in r
    ]
    return {
        "prompts": len(rows),
        "tokens_per_prompt": tokens,
        "identical_prompts": sum(a == tokens for a in agreed),
        "median_agreed_tokens": statistics.median(agreed),
        "min_agreed_tokens": min(agreed),
        "divergence_margin_max": max(margins) if margins else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llamacpp-python", default=None, help="the llama.cpp venv's python")
    parser.add_argument(
        "--llamacpp-only", action="store_true", help=argparse.SUPPRESS
    )  # the subprocess side
    args = parser.parse_args(argv)
    if args.llamacpp_only:
        prompts = json.load(sys.stdin)
        json.dump(llamacpp_greedy(args.model, prompts, args.tokens, args.threads), sys.stdout)
        return 0
    from kvrun.loader import default_model

    model = args.model or default_model()
    prompts, kv = kvrun_greedy(model, args.tokens)
    try:
        import llama_cpp  # type: ignore[import-not-found]  # noqa: F401

        cpp = llamacpp_greedy(model, prompts, args.tokens, args.threads)
    except ImportError:
        if args.llamacpp_python is None:
            print(
                "llama-cpp-python is not importable here: build its venv with "
                "`bash benchmarks/setup_peers.sh llamacpp` and pass --llamacpp-python "
                "benchmarks/.venvs/llamacpp/bin/python",
                file=sys.stderr,
            )
            return 2
        command = [args.llamacpp_python, __file__, "--llamacpp-only", "--model", model]
        command += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run(
            command, input=json.dumps(prompts), capture_output=True, text=True, check=True
        )
        cpp = json.loads(done.stdout)
    print(json.dumps({"summary": compare(kv, cpp, args.tokens), "model": model}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
