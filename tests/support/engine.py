"""Build engines and Hugging Face references for the engine tests."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.envs import read_env
from kvrun.outputs import RequestOutput
from kvrun.sampling_params import SamplingParams


def make_engine(model: str | Path, env: Mapping[str, str] | None = None, **kwargs: Any) -> LLMEngine:
    """An engine on the cpu platform; ``env`` adds variables to the real environment."""
    environ = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
    kwargs.setdefault("dtype", "float32")
    return LLMEngine(EngineArgs(model=str(model), **kwargs), read_env(environ))


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

    def drain() -> None:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out

    for rid, prompt, p in zip(ids, prompts, plist):
        engine.add_request(rid, prompt, p)
        if one_at_a_time:
            drain()
    drain()
    return [finished[r] for r in ids]


@torch.inference_mode()
def hf_greedy(
    model_dir: str | Path, prompts: Sequence[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Hugging Face transformers' greedy continuation of each prompt (fp32, one at a time).

    EOS does not stop it (like ignore_eos), and nothing is masked: a plain argmax loop
    over the model's KV cache. Also returns each step's log-softmax rows [N, V].
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    tokens_out, logprobs_out = [], []
    for prompt in prompts:
        out = model(torch.tensor([prompt]), use_cache=True)
        past = out.cache
        logits = out.logits[0, -1]
        generated: list[int] = []
        rows = []
        for _ in range(max_new_tokens):
            rows.append(torch.log_softmax(logits.float(), dim=-1))
            token = int(logits.argmax())
            generated.append(token)
            out = model(torch.tensor([[token]]), cache=past, use_cache=True)
            past = out.cache
            logits = out.logits[0, -1]
        tokens_out.append(generated)
        logprobs_out.append(torch.stack(rows))
    return tokens_out, logprobs_out
