"""Model classes by Hugging Face architecture name, extensible by general plugins.

Entries are lazily imported dotted paths ("module:Class"), so listing or
extending the registry imports no model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvrun.errors import ModelLoadError

__all__ = ["BUILTIN_ARCHITECTURES", "ModelRegistry"]

_LLAMA = "kvrun.models.llama:LlamaForCausalLM"
_MOE = "kvrun.models.llama:MixtureOfExpertsForCausalLM"
_GEMMA = "kvrun.models.gemma:GemmaForCausalLM"
_CLASSIFIER = "kvrun.models.llama:LlamaForSequenceClassification"
BUILTIN_ARCHITECTURES: Mapping[str, str] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": "kvrun.models.llama:Qwen3ForCausalLM",
    "Phi3ForCausalLM": _LLAMA,
    "MixtralForCausalLM": _MOE,
    "Qwen2MoeForCausalLM": _MOE,
    "Qwen3MoeForCausalLM": _MOE,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "DeepseekV2ForCausalLM": "kvrun.models.deepseek:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "kvrun.models.deepseek:DeepseekV3ForCausalLM",
    # multimodal (images, video): the vision tower and the Qwen2 decoder with M-RoPE
    "Qwen2VLForConditionalGeneration": "kvrun.models.qwen2_vl:Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": (
        "kvrun.models.qwen2_vl:Qwen2_5_VLForConditionalGeneration"
    ),
    # multimodal (audio): the Whisper-style encoder and the Qwen2 decoder
    "Qwen2AudioForConditionalGeneration": (
        "kvrun.models.qwen2_audio:Qwen2AudioForConditionalGeneration"
    ),
    # classifiers, for the pooling runner (convert="classify")
    "LlamaForSequenceClassification": _CLASSIFIER,
    "MistralForSequenceClassification": _CLASSIFIER,
    "Qwen2ForSequenceClassification": _CLASSIFIER,
    "Qwen3ForSequenceClassification": _CLASSIFIER,
}


@dataclass(frozen=True)
class ModelRegistry:
    """Architecture name -> "module:Class"; plugins add entries through their hook."""

    entries: Mapping[str, str] = field(default_factory=lambda: dict(BUILTIN_ARCHITECTURES))

    def extended(self, more: Mapping[str, str]) -> ModelRegistry:
        return ModelRegistry({**self.entries, **more})

    def resolve(self, architecture: str, source: str) -> Any:
        path = self.entries.get(architecture)
        if path is None:
            raise ModelLoadError(
                f"{source}: architecture {architecture!r} is not supported; supported: "
                f"{', '.join(sorted(self.entries))}"
            )
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)
