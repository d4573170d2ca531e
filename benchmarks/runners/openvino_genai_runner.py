"""Peer: OpenVINO GenAI's `ContinuousBatchingPipeline` on the CPU, greedy.

What an Intel CPU user would pick. The model is the benchmark's fp32 checkpoint
exported once to OpenVINO IR in fp32 (`optimum-cli export openvino --task
text-generation-with-past --weight-format fp32`, done by benchmarks/run.py), so the
weights are the other peers'; what runs is decided by the properties below.
Prompts go in as token ids (one ``ov.Tensor`` of shape [1, n] each), so the exported
tokenizer is never on the clock.

Options (spec "options"):

- "properties": OpenVINO properties for the CPU plugin on top of
  ``INFERENCE_NUM_THREADS = spec.threads``. Empty is OpenVINO's default: bf16
  inference where the CPU has AMX/AVX512_BF16, its default KV cache precision;
  ``{"INFERENCE_PRECISION_HINT": "f32"}`` runs float32 arithmetic;
- "scheduler": `SchedulerConfig` fields to set (its defaults otherwise, prefix
  caching off as theirs is); e.g. ``{"cache_size": 1}`` for a fixed 1 GB KV cache;
- "label": how run.py names this configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import Engine, RunSpec, main


class OpenVINOGenAIEngine(Engine):
    name = "openvino-genai"

    def __init__(self, spec: RunSpec) -> None:
        import numpy as np
        import openvino as ov  # type: ignore[import-not-found]  # only in its venv
        import openvino_genai as ov_genai  # type: ignore[import-not-found]

        self._np, self._ov, self._genai = np, ov, ov_genai
        self.name = spec.options.get("label", "openvino-genai")
        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        for key, value in spec.options.get("scheduler", {}).items():
            if not hasattr(scheduler, key):
                raise ValueError(f"SchedulerConfig has no field {key!r}")
            setattr(scheduler, key, value)
        self.properties: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": spec.threads,
            **spec.options.get("properties", {}),
        }
        self.scheduler = {
            key: getattr(scheduler, key)
            for key in (
                "cache_size",
                "max_num_batched_tokens",
                "max_num_seqs",
                "dynamic_split_fuse",
                "enable_prefix_caching",
            )
        }
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            spec.model, scheduler, "CPU", self.properties
        )

    def versions(self) -> dict[str, str]:
        return {
            "openvino-genai": self._genai.__version__.split("-")[0],
            "openvino": self._ov.__version__.split("-")[0],
        }

    def config(self) -> dict[str, Any]:
        # The pipeline does not expose its compiled model: what was asked, and the CPU
        # plugin's inference precision where none was (the KV cache's follows from it).
        default = self._ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        return {
            "batching": "continuous (ContinuousBatchingPipeline.generate)",
            "properties": self.properties,
            "inference_precision_default": str(default),
            "scheduler": self.scheduler,
        }

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        config = self._genai.GenerationConfig()
        config.max_new_tokens = max_tokens
        config.min_new_tokens = max_tokens
        config.ignore_eos = True
        config.do_sample = False
        ids = [self._ov.Tensor(self._np.asarray([p], dtype=self._np.int64)) for p in prompts]
        results = self.pipe.generate(ids, [config] * len(ids))
        return [list(r.m_generation_ids[0]) for r in results]


if __name__ == "__main__":
    raise SystemExit(main(OpenVINOGenAIEngine))
