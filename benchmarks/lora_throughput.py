"""Throughput with LoRA adapters against none (issue 18's benchmark).

    .venv/bin/python benchmarks/lora_throughput.py --repeats 3

The throughput workload (benchmarks/prompts.json's 64 chat prompts, 128 new tokens each,
greedy, EOS ignored) on the fp32 SmolLM2-135M checkpoint (benchmarks/checkpoint.py),
twice in this process: on an engine without LoRA, and on one with ``enable_lora=True``
whose requests are spread round-robin over 4 PEFT adapters (random A and B of rank
``--rank`` on q, k, v, o, gate, up and down, saved under benchmarks/models/lora-adapters/
once). Prints the median tokens per second of each over ``--repeats`` (after one warm-up
generate of a few prompts) and the ratio, and one JSON line with everything.
Run it on a quiet machine: it measures the engine, not the load of other processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from checkpoint import DEFAULT_OUT, build_checkpoint, default_gguf_path  # noqa: E402

ADAPTER_DIR = BENCH / "models" / "lora-adapters"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_ADAPTERS = 4


def _checkpoint() -> Path:
    if (DEFAULT_OUT / "config.json").is_file():
        return DEFAULT_OUT
    return build_checkpoint(default_gguf_path(), DEFAULT_OUT)


def _adapter(base: Path, index: int, rank: int) -> Path:
    """A PEFT adapter with random A and B (seeded by ``index``), built once."""
    out = ADAPTER_DIR / f"r{rank}-{index}"
    if (out / "adapter_config.json").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0)
    with warnings.catch_warnings():  # peft reads transformers' deprecated names
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g))
    peft_model.save_pretrained(str(out))
    return out


def _prompts(base: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    raw = json.loads((BENCH / "prompts.json").read_text(encoding="utf-8"))["throughput"]
    rendered = []
    for text in raw[:count]:
        ids: Any = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        rendered.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return rendered


def _measure(
    llm: Any, prompts: list[list[int]], loras: list[Any], max_tokens: int, repeats: int
) -> list[float]:
    """Tokens per second of each repeat (after a warm-up on the first prompts)."""
    import kvrun

    params = kvrun.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    warm = min(len(inputs), NUM_ADAPTERS)
    llm.generate(inputs[:warm], params, use_tqdm=False, lora_request=loras[:warm])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False, lora_request=loras)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts (at most 64)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--rank", type=int, default=16, choices=(8, 16), help="adapter rank")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 <= args.prompts <= 64 or args.max_tokens < 1:
        parser.error("--repeats >= 1, 1 <= --prompts <= 64 and --max-tokens >= 1")

    import kvrun

    base = _checkpoint()
    prompts = _prompts(base, args.prompts)
    adapters = [_adapter(base, i, args.rank) for i in range(NUM_ADAPTERS)]
    requests = [kvrun.LoRARequest(f"adapter-{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    engine_args: dict[str, Any] = {
        "model": str(base),
        "dtype": "float32",
        "max_model_len": 2048,
        "enable_prefix_caching": False,
        "seed": 0,
    }
    results: dict[str, list[float]] = {}
    for name, lora_args, loras in (
        ("none", {}, [None] * len(prompts)),
        (
            f"{NUM_ADAPTERS} adapters",
            {"enable_lora": True, "max_loras": NUM_ADAPTERS, "max_lora_rank": args.rank},
            [requests[i % NUM_ADAPTERS] for i in range(len(prompts))],
        ),
    ):
        llm = kvrun.LLM(**engine_args, **lora_args)
        results[name] = _measure(llm, prompts, loras, args.max_tokens, args.repeats)
        del llm
        gc.collect()

    medians = {name: statistics.median(rates) for name, rates in results.items()}
    lora_name = f"{NUM_ADAPTERS} adapters"
    slower = 1.0 - medians[lora_name] / medians["none"]
    print(f"{len(prompts)} prompts x {args.max_tokens} tokens, rank {args.rank}, fp32")
    for name, rates in results.items():
        print(f"  {name:>10}: {medians[name]:8.1f} tok/s (median of {len(rates)})")
    print(f"  {lora_name} are {100 * slower:.1f}% slower than none (goal: under 25%)")
    print(json.dumps({"tok_per_s": results, "median": medians, "slower": slower}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
