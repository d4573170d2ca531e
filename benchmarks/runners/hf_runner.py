"""Peer: Hugging Face transformers `generate`, batched with left padding, greedy.

Options: ``dtype`` (default "float32") and ``device`` (default "cpu"; "cuda" for the
GPU benchmark, where the timings wait for the GPU to finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common import Engine, RunSpec, main


class HFEngine(Engine):
    name = "hf"

    def __init__(self, spec: RunSpec) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec.threads)
        self._torch = torch
        self._transformers = transformers
        self.dtype = spec.options.get("dtype", "float32")
        self.device = torch.device(spec.options.get("device", "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=getattr(torch, self.dtype)
        ).to(self.device)
        self.model.eval()  # type: ignore[no-untyped-call]
        gen = self.model.generation_config
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        # ignore_eos as vLLM means it: EOS may be generated, it just does not stop the
        # sequence. (min_new_tokens would instead mask EOS and change greedy picks.)
        gen.eos_token_id = None
        gen.pad_token_id = self.pad_id

    def versions(self) -> dict[str, str]:
        return {"transformers": self._transformers.__version__, "torch": self._torch.__version__}

    def config(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "device": str(self.device),
            "batching": "one padded batch (left padding)",
        }

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        torch = self._torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=self.pad_id,
            )
        return [row[width:].tolist() for row in out.cpu()]  # .cpu() waits for the GPU


if __name__ == "__main__":
    raise SystemExit(main(HFEngine))
