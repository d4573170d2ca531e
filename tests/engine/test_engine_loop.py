"""The engine loop on a fake step runner: no checkpoint, no model, exact answers.

The fake runner is a real :class:`~kvrun.engine.step_runner.StepRunner`: it keeps a KV
"cache" of token ids, writes each chunk's tokens to the slots its block table names,
and predicts the next token from the tokens it reads back through that table. So a
step that reads the wrong blocks (a preemption, a prefix hit or a chunk boundary
handled wrongly) predicts the wrong token, and every answer below is computed
independently from the token sequence alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kvrun.config import EngineConfig
from kvrun.engine.batch import StepLogits
from kvrun.engine.builder import EngineParts
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.envs import read_env
from kvrun.outputs import RequestOutput
from kvrun.platforms import Platform
from kvrun.sampling_params import SamplingParams
from kvrun.scheduling.output import ScheduledChunk
from kvrun.scheduling.scheduler import Scheduler, SchedulerConfig
from kvrun.testing.checkpoints import build_word_tokenizer
from kvrun.tokenizer import Tokenizer, load_tokenizer_from_dir

VOCAB = 64  # ids 0-2 special, 3.. the words "w3".. "w63"
BLOCK = 4
MAX_LEN = 64


def next_token(tokens: Sequence[int]) -> int:
    """The fake model's greedy choice after ``tokens`` (never a special id)."""
    return sum((i + 1) * t for i, t in enumerate(tokens)) % (VOCAB - 3) + 3


class FakeRunner:
    """Logits from the tokens read back through each chunk's block table."""

    block_size = BLOCK

    def __init__(self, num_blocks: int) -> None:
        self.cache = [-1] * (num_blocks * BLOCK)
        self.steps = 0

    def commit_kv_cache(self) -> int:
        return 0

    def execute(
        self, chunks: Sequence[ScheduledChunk], prompt_logits_for: frozenset[str] = frozenset()
    ) -> StepLogits:
        self.steps += 1
        rows, ids, prompt_logits = [], [], {}
        for chunk in chunks:
            for j, token in enumerate(chunk.token_ids):
                pos = chunk.start_position + j
                self.cache[chunk.block_ids[pos // BLOCK] * BLOCK + pos % BLOCK] = token
            end = chunk.start_position + len(chunk.token_ids)
            seen = [self.cache[chunk.block_ids[p // BLOCK] * BLOCK + p % BLOCK] for p in range(end)]
            if chunk.request_id in prompt_logits_for:
                starts = range(chunk.start_position + 1, end + 1)
                prompt_logits[chunk.request_id] = torch.stack([_row(seen[:n]) for n in starts])
            if chunk.samples:
                rows.append(_row(seen))
                ids.append(chunk.request_id)
        logits = torch.stack(rows) if rows else torch.zeros(0, VOCAB)
        return StepLogits(logits=logits, request_ids=ids, prompt_logits=prompt_logits)


def _row(tokens: Sequence[int]) -> torch.Tensor:
    """A clear favourite (the greedy choice), then a spread for sampling to draw from."""
    row = torch.linspace(0.0, 2.0, VOCAB)
    row[:3] = -30.0  # special tokens: never sampled unless forced
    row[next_token(tokens)] = 8.0
    return row


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer_from_dir(build_word_tokenizer(tmp_path_factory.mktemp("words"), VOCAB))


def make_engine(
    tokenizer: Tokenizer,
    *,
    num_blocks: int = 64,
    budget: int = 8,
    max_num_seqs: int = 4,
    prefix_caching: bool = True,
    max_len: int = MAX_LEN,
) -> LLMEngine:
    env = read_env({})
    platform = _HostPlatform(env)
    config = EngineConfig(
        model_source="fake",
        model_name="fake",
        architecture="FakeForCausalLM",
        dtype=torch.float32,
        max_model_len=max_len,
        vocab_size=VOCAB,
        block_size=BLOCK,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=prefix_caching,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=5,
        platform_name="host",
        attention_backend="NONE",
        num_kv_blocks=num_blocks,
    )
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_len,
            block_size=BLOCK,
            num_blocks=num_blocks,
            enable_prefix_caching=prefix_caching,
        )
    )
    parts = EngineParts(platform, config, tokenizer, scheduler, FakeRunner(num_blocks))
    return LLMEngine(parts, env)


class _HostPlatform(Platform):
    """The smallest platform: host tensors, nothing else (the runner is fake)."""

    name = "host"
    device_type = "cpu"
    dist_backend = "gloo"

    def kv_cache_budget(self, request: object) -> tuple[int, str]:  # type: ignore[override]
        raise AssertionError("the fake runner owns its cache")


def greedy_reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def continuation(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    """The text ``ids`` add after ``prompt`` (the detokenizer decodes with the prompt as
    context, so a word tokenizer's separating space comes first)."""
    return tokenizer.decode([*prompt, *ids])[len(tokenizer.decode(prompt)) :]


def drain(engine: LLMEngine) -> dict[str, RequestOutput]:
    accumulator = OutputAccumulator()
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                done[out.request_id] = out
    return done


PROMPTS = [[5, 9, 13], [7] * 11, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21]]


def test_greedy_batched_and_chunked_equals_the_reference(tokenizer: Tokenizer) -> None:
    engine = make_engine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    done = drain(engine)
    for i, prompt in enumerate(PROMPTS):
        out = done[str(i)].outputs[0]
        assert out.token_ids == greedy_reference(prompt, 10)
        assert out.text == continuation(tokenizer, prompt, out.token_ids)
        assert out.finish_reason == "length"
    assert engine.scheduler.stats.kv_cache_usage == 0.0  # every block returned


def test_preemption_recomputes_and_changes_nothing(tokenizer: Tokenizer) -> None:
    # 9 blocks of 4 tokens cannot hold four sequences of 14 to 26 tokens at once.
    engine = make_engine(tokenizer, num_blocks=9, prefix_caching=False, max_len=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
    done = drain(engine)
    assert engine.scheduler.stats.num_preemptions_total > 0
    for i, prompt in enumerate(PROMPTS):
        assert done[str(i)].outputs[0].token_ids == greedy_reference(prompt, 12)


def test_a_prefix_hit_reads_the_shared_blocks(tokenizer: Tokenizer) -> None:
    engine = make_engine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    shared = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    engine.add_request("a", [*shared, 30], params)
    drain(engine)
    engine.add_request("b", [*shared, 40], params)
    done = drain(engine)
    assert done["b"].num_cached_tokens == 8  # two whole blocks of the shared prefix
    assert done["b"].outputs[0].token_ids == greedy_reference([*shared, 40], 6)


def test_n_seeded_sequences_differ_and_reproduce(tokenizer: Tokenizer) -> None:
    params = SamplingParams(n=3, seed=11, temperature=1.5, max_tokens=8, ignore_eos=True)

    def run() -> list[list[int]]:
        engine = make_engine(tokenizer)
        engine.add_request("r", [5, 9, 13], params)
        return [o.token_ids for o in drain(engine)["r"].outputs]

    first = run()
    assert len(first) == 3 and len({tuple(s) for s in first}) == 3
    assert run() == first


def test_stop_string_cuts_text_and_deltas_never_show_it(tokenizer: Tokenizer) -> None:
    prompt = [5, 9, 13]
    want = greedy_reference(prompt, 10)
    stop_word = f"w{want[4]}"  # the 5th generated word
    engine = make_engine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop_word])
    engine.add_request("r", prompt, params)
    streamed = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            streamed += [s.text for s in delta.sequences]
    text = "".join(streamed)
    full = continuation(tokenizer, prompt, want)
    assert text == full[: full.index(stop_word)]
    assert stop_word not in text


def test_abort_stops_one_request_and_frees_its_blocks(tokenizer: Tokenizer) -> None:
    engine = make_engine(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("keep", PROMPTS[0], params)
    engine.add_request("drop", PROMPTS[1], params)
    for _ in range(4):
        engine.step()
    engine.abort_request(["drop"])
    seen = set()
    accumulator = OutputAccumulator()
    finished = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            seen.add(delta.request_id)
            out = accumulator.add(delta)
            if out is not None and out.finished:
                finished[out.request_id] = out
    assert seen == {"keep"}
    assert finished["keep"].outputs[0].token_ids[-5:] == greedy_reference(PROMPTS[0], 20)[-5:]
    assert engine.scheduler.stats.kv_cache_usage == 0.0


def test_prompt_logprobs_come_once_and_match_the_fake_model(tokenizer: Tokenizer) -> None:
    engine = make_engine(tokenizer, budget=4)  # the 11-token prompt arrives in 3 chunks
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
    prompt = [7] * 11
    engine.add_request("r", prompt, params)
    with_prompt = []
    while engine.has_unfinished_requests():
        with_prompt += [d.prompt_logprobs for d in engine.step() if d.prompt_logprobs]
    (logprobs,) = with_prompt
    assert logprobs[0] is None and len(logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        (entry,) = logprobs[position].values()  # prompt_logprobs=0: the actual token only
        row = torch.log_softmax(_row(prompt[:position]), dim=0)
        assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-5)


def test_bad_requests_are_refused_before_they_queue(tokenizer: Tokenizer) -> None:
    engine = make_engine(tokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("x", [5, VOCAB], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length is 64"):
        engine.add_request("y", [5] * 10, SamplingParams(max_tokens=60))
    assert not engine.has_unfinished_requests()
    assert engine.runner.steps == 0  # type: ignore[attr-defined]
