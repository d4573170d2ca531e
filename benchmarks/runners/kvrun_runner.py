"""Peer: kvrun's offline `LLM.generate` (the vLLM-shaped API), greedy, fp32."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from common import JSON_SCHEMA, Engine, RunSpec, lora_engine_args, lora_requests, main, spread


def _engine_arg_names() -> set[str]:
    try:
        from kvrun.config import EngineArgs
    except ImportError:
        return set()
    return {f.name for f in dataclasses.fields(EngineArgs)}


class KvrunEngine(Engine):
    name = "kvrun"

    def __init__(self, spec: RunSpec) -> None:
        import kvrun

        self._kvrun = kvrun
        self.dtype = spec.options.get("dtype", "float32")
        self.json_schema = bool(spec.options.get("json_schema"))  # every request under JSON_SCHEMA
        wanted: dict[str, Any] = {
            "model": spec.model,
            "dtype": self.dtype,
            "max_model_len": spec.max_model_len,
            "enable_prefix_caching": False,
            "seed": 0,
        }
        wanted.update(lora_engine_args(spec.options))
        wanted.update(spec.options.get("engine_args", {}))
        # Pass only what this kvrun accepts (LLM's keywords are EngineArgs fields): the
        # engine is still growing knobs and refuses unknown ones.
        accepted = set(inspect.signature(kvrun.LLM).parameters) | _engine_arg_names()
        self.kwargs = {k: v for k, v in wanted.items() if k in accepted}
        self.llm = kvrun.LLM(**self.kwargs)
        # Requests spread round-robin over the adapters ({"lora": {...}} in the options).
        self.loras = lora_requests(spec.options, kvrun.LoRARequest)
        gen_params = inspect.signature(self.llm.generate).parameters
        self.generate_kwargs = {"use_tqdm": False} if "use_tqdm" in gen_params else {}

    def versions(self) -> dict[str, str]:
        import torch

        return {"kvrun": self._kvrun.__version__, "torch": torch.__version__}

    def config(self) -> dict[str, Any]:
        dropped = sorted({"enable_prefix_caching", "seed", "max_model_len"} - set(self.kwargs))
        return {
            "dtype": self.dtype,
            "batching": "continuous (offline LLM.generate)",
            "unsupported_kwargs": dropped,
            "adapters": len(self.loras),
        }

    def reset(self) -> None:
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        constraint = None
        if self.json_schema:
            constraint = self._kvrun.StructuredOutputsParams(json=JSON_SCHEMA)
        params = self._kvrun.SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.0,
            structured_outputs=constraint,
        )
        inputs = [{"prompt_token_ids": p} for p in prompts]
        loras = spread(self.loras, len(prompts))
        extra = {"lora_request": loras} if loras is not None else {}
        outs = self.llm.generate(inputs, params, **self.generate_kwargs, **extra)
        return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    raise SystemExit(main(KvrunEngine))
