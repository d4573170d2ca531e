"""Beam search on an :class:`~kvrun.engine.llm_engine.LLMEngine`, for :meth:`kvrun.LLM.beam_search`.

Each step adds one single-token request per running beam of every prompt (its prompt
plus the beam's tokens, ``max_tokens=1``, ``logprobs=2 * beam_width``), so the beams of
all prompts are batched into the same engine steps. A beam's request finds its prompt's
and its parent's full KV blocks in the prefix cache (the block manager's chained
hashes; the blocks are shared, reference-counted, while several beams run) and computes
only the tokens after the last full block. The search itself is
:class:`kvrun.beam_search.BeamSearch`.

A prompt searched with a LoRA adapter sends every one of its beams' requests with that
adapter: the candidates are the adapted model's, and the adapter's prefix-cache salt keeps
its blocks apart from the base model's (beams of the same prompt and adapter still share).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from kvrun.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    check_beam_search,
    sequence_text,
    step_params,
)
from kvrun.engine.llm_engine import LLMEngine
from kvrun.errors import KvrunError
from kvrun.lora.request import LoRARequest
from kvrun.outputs import Logprob
from kvrun.sampling_params import BeamSearchParams

__all__ = ["run_beam_search"]


def run_beam_search(
    engine: LLMEngine,
    prompts: Sequence[list[int]],
    params: BeamSearchParams,
    loras: Sequence[LoRARequest | None] = (),
) -> list[BeamSearchOutput]:
    """Search every prompt together; one output per prompt, in order.

    ``loras``: empty (the base model for all), or each prompt's adapter (or None). As
    vLLM's offline ``beam_search`` does, each sequence's ``text`` is the decoded prompt
    and generation, special tokens kept.
    """
    if loras and len(loras) != len(prompts):
        raise KvrunError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
    config = engine.config
    check_beam_search(
        prompts,
        params,
        vocab_size=config.vocab_size,
        max_model_len=config.max_model_len,
        max_logprobs=config.max_logprobs,
    )
    eos = engine.tokenizer.eos_token_ids
    searches = [BeamSearch(list(ids), params, eos) for ids in prompts]
    request = step_params(params)
    tag = uuid.uuid4().hex
    step = 0
    owners: dict[str, tuple[int, int]] = {}  # request id -> (prompt, beam)
    try:
        while True:
            owners = {}
            for s, search in enumerate(searches):
                for b, tokens in enumerate(search.pending()):
                    request_id = f"beam-{tag}-{s}-{step}-{b}"
                    lora = loras[s] if loras else None
                    engine.add_request(request_id, tokens, request, lora_request=lora)
                    owners[request_id] = (s, b)
            if not owners:
                break
            found = _run_step(engine, owners)
            for s, search in enumerate(searches):
                if not search.done:
                    search.advance([found[(s, b)] for b in range(len(search.running))])
            step += 1
    except BaseException:
        engine.abort_request(list(owners))
        raise
    outputs = []
    for search in searches:
        sequences = search.result()
        for beam in sequences:
            beam.text = sequence_text(
                engine.tokenizer, beam, params, with_prompt=True, skip_special_tokens=False
            )
        outputs.append(BeamSearchOutput(sequences))
    return outputs


def _run_step(
    engine: LLMEngine, owners: dict[str, tuple[int, int]]
) -> dict[tuple[int, int], dict[int, Logprob]]:
    """Step the engine until every beam's request has its one token's candidates."""
    found: dict[tuple[int, int], dict[int, Logprob]] = {}
    while len(found) < len(owners):
        if not engine.has_unfinished_requests():
            raise KvrunError("the engine finished beam search requests without their logprobs")
        for delta in engine.step():
            key = owners.get(delta.request_id)
            if key is None:
                continue
            for seq in delta.sequences:
                if seq.logprobs:
                    found[key] = seq.logprobs[-1]
        for _, error in engine.take_failed_requests():
            raise error
    return found
