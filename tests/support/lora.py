"""LoRA adapters made with peft on test checkpoints, and peft's greedy continuations.

Both are cached on disk (tests/support/checkpoints.cached_build), keyed by the base
directory and every setting, since transformers and peft are the slow part.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.support.checkpoints import cached_build

__all__ = ["make_adapter", "merged_checkpoint", "peft_greedy"]


def make_adapter(
    base: Path,
    *,
    seed: int,
    r: int = 8,
    alpha: float = 16,
    targets: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    std: float = 0.1,
    target_parameters: Sequence[str] = (),
    model_class: str | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A PEFT LoRA adapter for ``base`` with random A and B (nonzero B, unlike a fresh
    adapter) drawn from ``seed``, saved as adapter_config.json + adapter_model.safetensors.

    ``targets`` may be a regex string (PEFT's form); ``target_parameters`` names fused
    parameters (a mixture's ``experts.gate_up_proj``); ``model_class`` is the
    transformers class to load ``base`` with (default AutoModelForCausalLM)."""
    key: dict[str, Any] = {
        "base": str(base),
        "seed": seed,
        "r": r,
        "alpha": alpha,
        "targets": targets if isinstance(targets, str) else list(targets),
        "rslora": use_rslora,
        "std": std,
    }
    if target_parameters:  # only when set: the keys of earlier adapters stay the same
        key["target_parameters"] = list(target_parameters)
    if model_class is not None:
        key["model_class"] = model_class
    if rank_pattern or alpha_pattern:
        key["patterns"] = [rank_pattern or {}, alpha_pattern or {}]

    def build(out: Path) -> Path:
        import transformers
        from peft import LoraConfig, get_peft_model

        cls = getattr(transformers, model_class or "AutoModelForCausalLM")
        model = cls.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets if isinstance(targets, str) else list(targets),
            target_parameters=list(target_parameters) or None,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
            use_rslora=use_rslora,
            lora_dropout=0.0,
        )
        with warnings.catch_warnings():  # peft reads transformers' deprecated names
            warnings.simplefilter("ignore", FutureWarning)
            _ignore_pattern_warning()
            peft_model = get_peft_model(model, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(peft_model.named_parameters()):
                if "lora_" in name:
                    param.copy_(std * torch.randn(param.shape, generator=g))
        peft_model.save_pretrained(str(out))
        return out

    return cached_build("lora-adapter", key, build)


def peft_greedy(
    base: Path, adapter: Path | None, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (fp32, one prompt at a time, EOS ignored) of ``base`` with the
    adapter applied by peft (None: the base model alone)."""
    key = {
        "base": str(base),
        "adapter": str(adapter),
        "prompts": [list(p) for p in prompts],
        "n": max_new_tokens,
    }

    def build(out: Path) -> Path:
        tokens = _greedy(base, adapter, prompts, max_new_tokens)
        (out / "tokens.json").write_text(json.dumps(tokens))
        return out

    path = cached_build("peft-greedy", key, build) / "tokens.json"
    result: list[list[int]] = json.loads(path.read_text())
    return result


@torch.inference_mode()
def _greedy(
    base: Path, adapter: Path | None, prompts: Sequence[list[int]], max_new_tokens: int
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads transformers' deprecated names
            warnings.simplefilter("ignore", FutureWarning)
            _ignore_pattern_warning()
            model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    results = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        results.append(ids[len(prompt) :])
    return results


def merged_checkpoint(base: Path, adapter: Path, model_class: str | None = None) -> Path:
    """``base`` with ``adapter`` merged into its weights by peft (``merge_and_unload``),
    saved as a Hugging Face directory: the reference model for oracles that take a
    checkpoint (transformers' beam search, its hidden states). ``model_class``: the
    transformers class both are loaded with (default AutoModelForCausalLM)."""
    key = {"base": str(base), "adapter": str(adapter), "model_class": model_class}

    def build(out: Path) -> Path:
        import transformers
        from peft import PeftModel

        cls = getattr(transformers, model_class or "AutoModelForCausalLM")
        model = cls.from_pretrained(str(base), dtype=torch.float32)
        with warnings.catch_warnings():  # peft reads transformers' deprecated names
            warnings.simplefilter("ignore", FutureWarning)
            _ignore_pattern_warning()
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        peft_model.merge_and_unload().save_pretrained(str(out))
        return out

    return cached_build("lora-merged", key, build)


def _ignore_pattern_warning() -> None:
    """peft checks rank_pattern against module names only, so the pattern it sets itself
    for a mixture's fused ``experts.gate_up_proj`` (which it does apply) draws a warning
    that it matched nothing."""
    warnings.filterwarnings(
        "ignore", r"The following (rank|alpha)_pattern keys did not match", RuntimeWarning
    )
