"""Beam search as a state machine over one-token steps, shaped like vLLM's ``vllm.beam_search``.

:class:`BeamSearch` holds one prompt's search and does no I/O: :meth:`~BeamSearch.pending`
says which token sequences need their next-token candidates, :meth:`~BeamSearch.advance`
takes them (each sequence's ``2 * beam_width`` most likely next tokens with raw
logprobs). The offline :meth:`kvrun.LLM.beam_search` and the server's
``use_beam_search`` drive it with one single-token engine request per beam per step;
those requests share their prompt's KV blocks through the prefix cache.

The search is transformers' (``generate(num_beams=k, do_sample=False,
early_stopping="never")``), the algorithm vLLM adapts:

- each step ranks every running beam's candidates by cumulative logprob and keeps the
  best ``2k``;
- a candidate that ends its beam (an EOS id unless ``ignore_eos``, or the
  ``max_tokens``-th token) is a finished hypothesis only when it ranks among the best
  ``k`` of those; its score is ``cum_logprob / generated_len ** length_penalty``, EOS
  counted in the length;
- the best ``k`` candidates that do not end become the next running beams;
- the ``k`` best-scoring finished hypotheses are the result. The search stops early
  only when no running beam can still beat the worst of them (logprobs are <= 0, so
  the bound is exact and stopping changes nothing).

Where vLLM differs: it counts the prompt in the length it divides by, and it keeps an
EOS candidate that ranks below the best ``k``; kvrun follows transformers on both.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvrun.outputs import Logprob, RequestOutputKind
from kvrun.sampling_params import BeamSearchParams, SamplingParams
from kvrun.validation import check_prompt, resolve_max_tokens

if TYPE_CHECKING:
    from kvrun.tokenizer import Tokenizer

__all__ = [
    "BeamSearch",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "beam_score",
    "check_beam_search",
    "sequence_text",
    "step_params",
]


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's, then the generated ones) and their logprobs."""

    tokens: list[int]  # prompt ids then generated ids, as vLLM keeps them
    logprobs: list[dict[int, Logprob]]  # [generated] the candidates each step ranked
    cum_logprob: float = 0.0  # sum of the generated tokens' raw logprobs
    text: str | None = None  # filled when the sequence is returned
    finish_reason: str | None = None  # "stop" (an EOS id) or "length" (max_tokens)
    stop_reason: int | str | None = None  # vLLM's field; None (EOS is no stop token)
    num_prompt_tokens: int = 0  # where the generated part of ``tokens`` starts

    @property
    def generated_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """One prompt's result: its ``beam_width`` best sequences, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(cum_logprob: float, num_generated: int, length_penalty: float) -> float:
    """transformers' length-normalised score of a finished hypothesis."""
    return cum_logprob / float(num_generated**length_penalty)


@dataclass
class _Finished:
    score: float
    order: int  # ties keep the earlier hypothesis first
    sequence: BeamSearchSequence


@dataclass
class BeamSearch:
    """One prompt's beam search; see the module docstring for the rule."""

    prompt_token_ids: list[int]
    params: BeamSearchParams
    eos_token_ids: Collection[int]
    running: list[BeamSearchSequence] = field(init=False)
    finished: list[_Finished] = field(init=False, default_factory=list)
    num_generated: int = field(init=False, default=0)  # tokens each running beam has
    done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        prompt = list(self.prompt_token_ids)
        self.running = [BeamSearchSequence(prompt, [], num_prompt_tokens=len(prompt))]

    @property
    def num_candidates(self) -> int:
        """How many of each beam's most likely next tokens a step needs."""
        return 2 * self.params.beam_width

    def pending(self) -> list[list[int]]:
        """The token sequences (prompt included) whose next-token candidates come next."""
        return [] if self.done else [beam.tokens for beam in self.running]

    def advance(self, candidates: Sequence[dict[int, Logprob]]) -> None:
        """One step: ``candidates[i]`` holds at least the ``num_candidates`` most likely
        next tokens of ``pending()[i]`` (rank 1 = most likely); others are ignored."""
        assert not self.done and len(candidates) == len(self.running)
        k = self.params.beam_width
        ranked: list[tuple[float, int, int, int, Logprob, dict[int, Logprob]]] = []
        for b, (beam, entry) in enumerate(zip(self.running, candidates, strict=True)):
            for token, lp in entry.items():
                if lp.rank <= self.num_candidates:
                    ranked.append((beam.cum_logprob + lp.logprob, b, token, lp.rank, lp, entry))
        # best cumulative logprob first; ties by beam, then by the model's own rank
        ranked.sort(key=lambda c: (-c[0], c[1], c[3]))
        top = ranked[: self.num_candidates]
        self.num_generated += 1
        last = self.num_generated >= self.params.max_tokens
        running: list[BeamSearchSequence] = []
        for position, (cum, b, token, _, _, entry) in enumerate(top):
            parent = self.running[b]
            is_eos = token in self.eos_token_ids and not self.params.ignore_eos
            ends = is_eos or last
            if ends and position >= k:
                continue  # a backup candidate: it only keeps k beams running
            if not ends and len(running) == k:
                continue
            beam = BeamSearchSequence(
                tokens=[*parent.tokens, token],
                logprobs=[*parent.logprobs, entry],
                cum_logprob=cum,
                num_prompt_tokens=parent.num_prompt_tokens,
            )
            if ends:
                beam.finish_reason = "stop" if is_eos else "length"
                self._add_finished(beam)
            else:
                running.append(beam)
        self.running = running
        self.done = not running or self._cannot_improve()

    def _add_finished(self, beam: BeamSearchSequence) -> None:
        score = beam_score(beam.cum_logprob, self.num_generated, self.params.length_penalty)
        self.finished.append(_Finished(score, len(self.finished), beam))
        self.finished.sort(key=lambda f: (-f.score, f.order))
        del self.finished[self.params.beam_width :]

    def _cannot_improve(self) -> bool:
        """Whether no running beam can still enter the k best finished hypotheses."""
        if len(self.finished) < self.params.beam_width:
            return False
        penalty = self.params.length_penalty
        # A running beam's cum_logprob only falls; its best length is the longest when
        # the penalty rewards length, else the next one.
        length = self.params.max_tokens if penalty > 0 else self.num_generated + 1
        best = max(beam.cum_logprob for beam in self.running) / float(length**penalty)
        return best <= self.finished[-1].score

    def result(self) -> list[BeamSearchSequence]:
        """The ``beam_width`` best finished sequences, best first (text not filled)."""
        assert self.done
        return [f.sequence for f in self.finished]


def check_beam_search(
    prompts: Sequence[Sequence[int]],
    params: BeamSearchParams,
    *,
    vocab_size: int,
    max_model_len: int,
    max_logprobs: int,
) -> None:
    """RequestError naming the field when the search cannot run: beam_width over the
    logprob cap, a bad prompt, or no room for max_tokens after a prompt."""
    params.verify(vocab_size, max_logprobs)
    for ids in prompts:
        check_prompt(ids, vocab_size=vocab_size, max_model_len=max_model_len)
        resolve_max_tokens(params.max_tokens, prompt_len=len(ids), max_model_len=max_model_len)


def step_params(params: BeamSearchParams) -> SamplingParams:
    """The request each beam makes per step: one token and its candidates' logprobs."""
    return SamplingParams(
        max_tokens=1,
        temperature=params.temperature,
        logprobs=2 * params.beam_width,
        ignore_eos=True,  # the search decides what EOS means
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def sequence_text(
    tokenizer: Tokenizer,
    beam: BeamSearchSequence,
    params: BeamSearchParams,
    *,
    with_prompt: bool,
    skip_special_tokens: bool,
) -> str:
    """The beam's text; its ending EOS only with ``include_stop_str_in_output``."""
    tokens = beam.tokens if with_prompt else beam.generated_token_ids
    if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
