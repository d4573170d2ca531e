"""Build engines and Hugging Face references for the engine tests."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.envs import read_env
from kvrun.outputs import RequestOutput
from kvrun.sampling_params import SamplingParams
from tests.support.checkpoints import cached_build


def make_engine(
    model: str | Path, env: Mapping[str, str] | None = None, **kwargs: Any
) -> LLMEngine:
    """An engine on the cpu platform; ``env`` adds variables to the real environment."""
    environ = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
    kwargs.setdefault("dtype", "float32")
    return LLMEngine.from_args(EngineArgs(model=str(model), **kwargs), read_env(environ))


def run_all(
    engine: LLMEngine,
    prompts: Sequence[list[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    one_at_a_time: bool = False,
) -> list[RequestOutput]:
    """Generate for every prompt; outputs in prompt order."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    finished: dict[str, RequestOutput] = {}
    ids = [engine.new_request_id() for _ in prompts]

    accumulator = OutputAccumulator()

    def drain() -> None:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                out = accumulator.add(delta)
                if out is not None and out.finished:
                    finished[out.request_id] = out

    for rid, prompt, p in zip(ids, prompts, plist):
        engine.add_request(rid, prompt, p)
        if one_at_a_time:
            drain()
    drain()
    return [finished[r] for r in ids]


@dataclass(frozen=True)
class Reference:
    """Transformers' greedy continuation of each prompt, with per-step logprobs."""

    tokens: list[list[int]]  # [prompt][step] chosen token id
    chosen_logprobs: list[list[float]]  # [prompt][step] the chosen token's logprob
    top_ids: list[list[list[int]]]  # [prompt][step][k] the TOP_K most likely ids
    top_logprobs: list[list[list[float]]]  # [prompt][step][k] their logprobs


TOP_K = 8


def hf_greedy(
    model_dir: str | Path, prompts: Sequence[list[int]], max_new_tokens: int
) -> Reference:
    """Hugging Face transformers' greedy continuation (fp32, one prompt at a time), cached.

    EOS does not stop it (like ignore_eos), and nothing is masked: a plain argmax loop
    over the model's KV cache. The result is cached on disk keyed by the model
    directory, the prompts and transformers' version, since it is the slow part.
    """
    key = {"model": str(model_dir), "prompts": [list(p) for p in prompts], "n": max_new_tokens}

    def build(out: Path) -> Path:
        ref = _hf_greedy(model_dir, prompts, max_new_tokens)
        (out / "reference.json").write_text(json.dumps(asdict(ref)))
        return out

    data = json.loads((cached_build("hf-greedy", key, build) / "reference.json").read_text())
    return Reference(**data)


@torch.inference_mode()
def _hf_greedy(
    model_dir: str | Path, prompts: Sequence[list[int]], max_new_tokens: int
) -> Reference:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ref = Reference([], [], [], [])
    for prompt in prompts:
        out = model(torch.tensor([prompt]), use_cache=True)
        past = out.cache
        logits = out.logits[0, -1]
        tokens, chosen, top_ids, top_values = [], [], [], []
        for _ in range(max_new_tokens):
            row = torch.log_softmax(logits.float(), dim=-1)
            token = int(logits.argmax())
            top = torch.topk(row, TOP_K)
            tokens.append(token)
            chosen.append(float(row[token]))
            top_ids.append(top.indices.tolist())
            top_values.append(top.values.tolist())
            out = model(torch.tensor([[token]]), cache=past, use_cache=True)
            past = out.cache
            logits = out.logits[0, -1]
        ref.tokens.append(tokens)
        ref.chosen_logprobs.append(chosen)
        ref.top_ids.append(top_ids)
        ref.top_logprobs.append(top_values)
    return ref
