"""The engine's side of sampling: rows from sequence state, logprob texts, generators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from kvrun.engine.sequence import SequenceState
from kvrun.ops import reference
from kvrun.outputs import Logprob
from kvrun.sampling import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    build_sampling_metadata,
    logprob_dicts,
    make_generator,
)
from kvrun.sampling.truncation import TopKTopPSampler
from kvrun.tokenizer import Tokenizer

__all__ = ["SamplingStep"]


class SamplingStep:
    """Builds each step's sampler input from the sequences that sample, and runs it."""

    def __init__(
        self,
        device: torch.device,
        *,
        logits_processor_threads: int,
        top_k_top_p: TopKTopPSampler | None = None,  # the platform's kernel, if any
        apply_token_bitmask: Callable[..., None] = reference.apply_token_bitmask,  # the op table's
        argmax: Callable[[torch.Tensor], torch.Tensor] = reference.argmax,  # the op table's
    ) -> None:
        self.device = device
        self.sampler = Sampler(logits_processor_threads, top_k_top_p, apply_token_bitmask, argmax)

    def make_generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else make_generator(seed, self.device)

    def sample(self, logits: torch.Tensor, states: Sequence[SequenceState]) -> SamplerOutput:
        """One token per state; ``logits`` is [len(states), V] float32."""
        if not states:  # a step of pooling requests only
            empty = torch.empty(0, dtype=torch.int64, device=logits.device)
            return SamplerOutput(sampled=empty, token_ids=[], logprobs=[])
        rows = [
            SamplingRow(
                params=s.params,
                prompt_token_ids=s.parent.prompt_token_ids,
                output_token_ids=s.token_ids,
                generator=s.generator,
                bad_words_token_ids=s.bad_words_ids,
                eos_token_ids=tuple(s.eos_token_ids),
                token_mask=s.constraint,
            )
            for s in states
        ]
        metadata = build_sampling_metadata(rows, logits.shape[1], self.device)
        return self.sampler(logits, metadata)

    def prompt_logprobs(
        self, logits: torch.Tensor, targets: Sequence[int], num: int
    ) -> list[dict[int, Logprob]]:
        """Logprobs of the given next prompt tokens; logits row i predicts targets[i]."""
        raw = torch.log_softmax(logits.float(), dim=1)
        ids = torch.tensor(list(targets), dtype=torch.int64, device=logits.device)
        return logprob_dicts(raw, ids, [num] * len(targets))

    @staticmethod
    def decode_logprobs(entry: dict[int, Logprob], tokenizer: Tokenizer) -> dict[int, Logprob]:
        """Fill each candidate's decoded text (the token as the model spells it)."""
        return {
            token: replace(lp, decoded_token=tokenizer.decode([token], skip_special_tokens=False))
            for token, lp in entry.items()
        }

    def close(self) -> None:
        self.sampler.close()
