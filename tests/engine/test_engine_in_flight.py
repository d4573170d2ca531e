"""The engine loop with several batches in flight, on the fake step runner of
test_engine_loop.py made concurrent the way pipelined workers are: ``submit`` queues a
step, ``collect`` runs the oldest (steps run in submission order) and returns its
logits. Every answer is the serial engine's, computed independently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import pytest

from kvrun.engine.batch import StepLogits
from kvrun.engine.builder import EngineParts
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.engine.step_runner import concurrent_batches
from kvrun.envs import read_env
from kvrun.outputs import RequestOutput
from kvrun.sampling_params import SamplingParams
from kvrun.scheduling.output import ScheduledChunk
from kvrun.scheduling.scheduler import Scheduler
from kvrun.tokenizer import Tokenizer
from tests.engine.test_engine_loop import (
    MAX_LEN,
    PROMPTS,
    FakeRunner,
    greedy_reference,
    make_engine,
    tokenizer,
)

__all__ = ["tokenizer"]  # the fixture, shared with test_engine_loop


class PipelinedRunner(FakeRunner):
    """FakeRunner taking up to ``max_concurrent_batches`` steps in flight."""

    def __init__(self, num_blocks: int, max_concurrent_batches: int) -> None:
        super().__init__(num_blocks)
        self.max_concurrent_batches = max_concurrent_batches
        self.pending: deque[tuple[list[ScheduledChunk], frozenset[str]]] = deque()
        self.peak_in_flight = 0
        self.batch_sizes: list[int] = []

    def submit(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> None:
        assert len(self.pending) < self.max_concurrent_batches
        in_flight = {c.request_id for batch, _ in self.pending for c in batch}
        assert not in_flight & {c.request_id for c in chunks}, "a request in two batches"
        self.pending.append((list(chunks), prompt_logits_for))
        self.peak_in_flight = max(self.peak_in_flight, len(self.pending))
        self.batch_sizes.append(len(chunks))

    def collect(self) -> StepLogits:
        chunks, prompt_logits_for = self.pending.popleft()
        return FakeRunner.execute(self, chunks, prompt_logits_for)

    def execute(  # type: ignore[override]
        self, chunks: Sequence[ScheduledChunk], prompt_logits_for: frozenset[str] = frozenset()
    ) -> StepLogits:
        assert not self.pending, "execute() with steps in flight"
        return FakeRunner.execute(self, chunks, prompt_logits_for)


def pipelined_engine(
    tokenizer: Tokenizer,
    *,
    num_blocks: int = 64,
    budget: int = 8,
    max_num_seqs: int = 4,
    prefix_caching: bool = True,
    max_len: int = MAX_LEN,
    batches: int = 2,
) -> tuple[LLMEngine, PipelinedRunner]:
    serial = make_engine(
        tokenizer,
        num_blocks=num_blocks,
        budget=budget,
        max_num_seqs=max_num_seqs,
        prefix_caching=prefix_caching,
        max_len=max_len,
    )
    runner = PipelinedRunner(num_blocks, batches)
    scheduler = Scheduler(serial.scheduler.config, max_concurrent_batches=batches)
    parts = EngineParts(serial.platform, serial.config, tokenizer, scheduler, runner)
    return LLMEngine(parts, read_env({})), runner


def drain(engine: LLMEngine) -> tuple[dict[str, RequestOutput], dict[str, list[str]]]:
    """Finished outputs, and each request's streamed text pieces."""
    accumulator = OutputAccumulator()
    done: dict[str, RequestOutput] = {}
    streamed: dict[str, list[str]] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            streamed.setdefault(delta.request_id, []).extend(s.text for s in delta.sequences)
            out = accumulator.add(delta)
            if out is not None and out.finished:
                done[out.request_id] = out
    return done, streamed


def _mixed_requests(engine: LLMEngine) -> None:
    want = greedy_reference(PROMPTS[0], 10)
    for i, prompt in enumerate(PROMPTS):
        greedy = SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=2)
        engine.add_request(f"g{i}", prompt, greedy)
    engine.add_request(
        "stop",
        PROMPTS[0],
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[f"w{want[4]}"]),
    )
    engine.add_request(
        "seeded", PROMPTS[2], SamplingParams(n=2, seed=5, temperature=1.5, max_tokens=7)
    )
    engine.add_request(
        "prompt-lp", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1)
    )


def _summary(done: dict[str, RequestOutput]) -> dict[str, object]:
    return {
        rid: (
            [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in out.outputs],
            [[(t, round(lp.logprob, 5)) for e in o.logprobs or [] for t, lp in e.items()]
             for o in out.outputs],
            [None if e is None else sorted(e) for e in out.prompt_logprobs or []],
        )
        for rid, out in done.items()
    }  # fmt: skip


def test_batches_in_flight_give_the_serial_engines_outputs(tokenizer: Tokenizer) -> None:
    serial = make_engine(tokenizer)
    _mixed_requests(serial)
    want, want_streamed = drain(serial)
    engine, runner = pipelined_engine(tokenizer)
    assert concurrent_batches(runner) == 2
    _mixed_requests(engine)
    got, got_streamed = drain(engine)
    assert _summary(got) == _summary(want)
    assert got_streamed == want_streamed
    assert runner.peak_in_flight == 2
    assert engine.scheduler.stats.kv_cache_usage == 0.0
    assert got["g0"].outputs[0].token_ids == greedy_reference(PROMPTS[0], 4)


def test_preemption_with_batches_in_flight(tokenizer: Tokenizer) -> None:
    engine, runner = pipelined_engine(tokenizer, num_blocks=9, prefix_caching=False, max_len=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    done, _ = drain(engine)
    assert engine.scheduler.stats.num_preemptions_total > 0
    assert runner.peak_in_flight == 2
    for i, prompt in enumerate(PROMPTS):
        assert done[str(i)].outputs[0].token_ids == greedy_reference(prompt, 12)
    assert engine.scheduler.stats.kv_cache_usage == 0.0


def test_an_abort_in_flight_ends_the_request_when_its_batch_returns(tokenizer: Tokenizer) -> None:
    engine, runner = pipelined_engine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for name, prompt in (("keep", PROMPTS[0]), ("drop", PROMPTS[1]), ("also", PROMPTS[3])):
        engine.add_request(name, prompt, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(20):
        for delta in engine.step():
            for seq in delta.sequences:
                tokens.setdefault(delta.request_id, []).extend(seq.token_ids)
        if engine.scheduler.is_in_flight("drop") and tokens.get("drop"):
            break
    assert engine.scheduler.is_in_flight("drop")
    at_abort = list(tokens["drop"])
    engine.abort_request(["drop"])
    assert engine.scheduler.stats.kv_cache_usage > 0.0  # its blocks: the batch still runs
    finished = set()
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.request_id != "drop"
            for seq in delta.sequences:
                tokens[delta.request_id].extend(seq.token_ids)
            if delta.finished:
                finished.add(delta.request_id)
    assert finished == {"keep", "also"}
    assert tokens["drop"] == at_abort
    assert tokens["keep"] == greedy_reference(PROMPTS[0], 20)
    assert tokens["also"] == greedy_reference(PROMPTS[3], 20)
    assert engine.scheduler.stats.kv_cache_usage == 0.0
    assert not runner.pending and engine.scheduler.num_in_flight == 0


def test_one_request_alone_has_one_batch_in_flight(tokenizer: Tokenizer) -> None:
    engine, runner = pipelined_engine(tokenizer)
    engine.add_request("r", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=6))
    done, _ = drain(engine)
    assert done["r"].outputs[0].token_ids == greedy_reference(PROMPTS[2], 6)
    assert runner.peak_in_flight == 1


def test_a_scheduler_built_for_other_batches_is_refused(tokenizer: Tokenizer) -> None:
    serial = make_engine(tokenizer)
    parts = EngineParts(
        serial.platform, serial.config, tokenizer, serial.scheduler, PipelinedRunner(64, 2)
    )
    with pytest.raises(ValueError, match=r"takes 1 batch.*takes 2; build the Scheduler with"):
        LLMEngine(parts, read_env({}))


def test_bad_max_concurrent_batches_is_refused() -> None:
    runner = PipelinedRunner(4, 0)
    with pytest.raises(ValueError, match=r"max_concurrent_batches=0: a positive integer"):
        concurrent_batches(runner)
    assert concurrent_batches(FakeRunner(4)) == 1
    serial = FakeRunner(4)
    serial.max_concurrent_batches = 2  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"has no submit\(\) and collect\(\)"):
        concurrent_batches(serial)
