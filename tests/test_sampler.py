"""The sampler against hand-computed logits, exact supports and reproducible seeds."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from kvrun.sampling import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    build_sampling_metadata,
    make_generator,
    process_logits,
    prompt_logprobs,
)
from kvrun.sampling.truncation import apply_top_p
from kvrun.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
# Probabilities chosen so every truncation below has a clear margin.
PROBS = [0.30, 0.25, 0.20, 0.10, 0.05, 0.05, 0.03, 0.02]
LOGITS = [math.log(p) for p in PROBS]


def row(
    params: SamplingParams, prompt: Sequence[int] = (0,), output: Sequence[int] = (), **kw: object
) -> SamplingRow:
    return SamplingRow(params=params, prompt_token_ids=prompt, output_token_ids=output, **kw)  # type: ignore[arg-type]


def metadata(rows: Sequence[SamplingRow], vocab: int) -> SamplingMetadata:
    return build_sampling_metadata(rows, vocab, torch.empty(0).device)


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], threads: int = 0) -> list[int]:
    sampler = Sampler(logits_processor_threads=threads)
    try:
        return sampler(logits.clone(), metadata(rows, logits.shape[1])).token_ids
    finally:
        sampler.close()


def processed(logits: list[list[float]], rows: Sequence[SamplingRow]) -> list[list[float]]:
    t = torch.tensor(logits)
    return process_logits(t, metadata(rows, t.shape[1])).tolist()


def draws(
    params: SamplingParams, count: int = 3000, logits: Sequence[float] = LOGITS, seed: int = 0
) -> Counter[int]:
    """Sample ``count`` identical rows in one batch, all from one seeded generator."""
    generator = make_generator(seed, torch.empty(0).device)
    rows = [row(params, generator=generator) for _ in range(count)]
    return Counter(sample(torch.tensor([list(logits)] * count), rows))


def test_greedy_is_argmax_and_builds_nothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    md = metadata([row(GREEDY)] * 5, 50)
    assert md.all_greedy and md.random_rows is None and md.output_ids is None
    assert md.banned_index is None and md.logprob_rows is None and md.temperature is None
    assert sample(logits, [row(GREEDY)] * 5) == logits.argmax(dim=1).tolist()


def test_greedy_rows_exact_beside_random_rows() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    rows = [row(GREEDY), row(SamplingParams()), row(GREEDY), row(SamplingParams(top_k=2))]
    tokens = sample(logits, rows)
    argmax = logits.argmax(dim=1).tolist()
    assert (tokens[0], tokens[2]) == (argmax[0], argmax[2])
    assert tokens[3] in logits[3].topk(2).indices.tolist()


def test_repetition_penalty_hf_semantics() -> None:
    # Tokens 0 (prompt), 1 and 3 (output) are seen: positive logits divided, negative multiplied.
    p = SamplingParams(repetition_penalty=2.0)
    out = processed([[2.0, -1.0, 0.5, 3.0]], [row(p, prompt=[0], output=[1, 1, 3])])
    assert out == [[1.0, -2.0, 0.5, 1.5]]


def test_frequency_and_presence_penalties_over_output_only() -> None:
    logits = [[2.0, -1.0, 0.5, 3.0]]
    freq = SamplingParams(frequency_penalty=0.5)
    assert processed(logits, [row(freq, prompt=[0], output=[1, 1, 3])]) == [[2.0, -2.0, 0.5, 2.5]]
    pres = SamplingParams(presence_penalty=0.25)
    assert processed(logits, [row(pres, prompt=[0], output=[1, 1, 3])]) == [[2.0, -1.25, 0.5, 2.75]]


def test_all_penalties_together_and_neutral_batch_mate() -> None:
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [row(p, prompt=[0], output=[1, 1, 3]), row(GREEDY, prompt=[0], output=[1, 1, 3])]
    out = processed([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]], rows)
    assert out == [[1.0, -3.25, 0.5, 0.75], [2.0, -1.0, 0.5, 3.0]]


def test_presence_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9]])
    assert sample(logits, [row(GREEDY, output=[0])]) == [0]
    assert sample(
        logits, [row(SamplingParams(temperature=0, presence_penalty=0.5), output=[0])]
    ) == [1]


@pytest.mark.parametrize(
    ("params", "support"),
    [
        (SamplingParams(), {0, 1, 2, 3, 4, 5, 6, 7}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_k=1), {0}),
        (SamplingParams(top_k=100), {0, 1, 2, 3, 4, 5, 6, 7}),
        (SamplingParams(top_p=0.7), {0, 1, 2}),  # mass before token 3 is 0.75
        (SamplingParams(top_p=0.5), {0, 1}),  # mass before token 2 is 0.55
        (SamplingParams(top_p=0.01), {0}),
        (SamplingParams(min_p=0.5), {0, 1, 2}),  # keeps p >= 0.15
        (SamplingParams(min_p=0.7), {0, 1}),  # keeps p >= 0.21
        (SamplingParams(top_k=4, top_p=0.5), {0, 1}),
        (SamplingParams(top_k=5, min_p=0.3), {0, 1, 2, 3}),  # keeps p >= 0.09
        (SamplingParams(top_p=0.9, temperature=0.5), {0, 1, 2}),  # sharper: p ~ p^2
    ],
)
def test_truncation_leaves_exact_support(params: SamplingParams, support: set[int]) -> None:
    assert set(draws(params)) == support


def test_draws_follow_the_distribution() -> None:
    counts = draws(SamplingParams(), count=4000)
    for token, p in enumerate(PROBS):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token])
    # top_k renormalises over what is kept: 0.30 / 0.75 and 0.25 / 0.75 and 0.20 / 0.75.
    counts = draws(SamplingParams(top_k=3), count=4000)
    for token, p in enumerate([0.4, 1 / 3, 0.8 / 3]):
        assert abs(counts[token] / 4000 - p) < 0.03, (token, counts[token])


def test_temperature_sharpens() -> None:
    counts = draws(SamplingParams(temperature=0.5), count=4000)
    z = sum(p**2 for p in PROBS)
    for token, p in enumerate(PROBS[:3]):
        assert abs(counts[token] / 4000 - p**2 / z) < 0.03, (token, counts[token])


def test_seed_reproducible_across_batch_mates_and_positions() -> None:
    vocab = 1000
    flat = torch.zeros(vocab)  # uniform: a coincidence is a 1-in-1000 event per step
    device = flat.device
    seeded = SamplingParams(seed=7)

    def run(steps: int, mates_before: int, mates_after: int) -> list[int]:
        generator = make_generator(7, device)  # made once per request, kept across steps
        other = make_generator(3, device)
        tokens: list[int] = []
        for _ in range(steps):
            before = [row(SamplingParams()) for _ in range(mates_before)]
            after = [row(SamplingParams(seed=3), generator=other), row(GREEDY)][:mates_after]
            rows = [*before, row(seeded, output=tokens, generator=generator), *after]
            logits = torch.randn(len(rows), vocab)  # mates' logits change run to run
            logits[mates_before] = flat
            tokens.append(sample(logits, rows)[mates_before])
        return tokens

    alone = run(5, 0, 0)
    assert run(5, 2, 1) == alone
    assert run(5, 0, 2) == alone
    assert run(5, 3, 0) == alone
    assert len(set(alone)) > 1

    def other_seed() -> list[int]:
        generator = make_generator(8, device)
        return [
            sample(flat[None], [row(SamplingParams(seed=8), generator=generator)])[0]
            for _ in range(5)
        ]

    assert other_seed() != alone


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    raw = torch.log_softmax(logits, dim=1)
    rows = [
        row(SamplingParams(temperature=0, logprobs=0)),
        row(SamplingParams(temperature=0, logprobs=3)),
        row(GREEDY),
    ]
    out = Sampler()(logits.clone(), metadata(rows, 20))
    assert out.logprobs[2] is None
    top0 = int(raw[0].argmax())
    assert out.token_ids[0] == top0
    first = out.logprobs[0]
    assert first is not None and list(first) == [top0] and first[top0].rank == 1
    assert first[top0].logprob == pytest.approx(float(raw[0, top0]), abs=1e-6)
    values, ids = raw[1].topk(3)
    entry = out.logprobs[1]
    assert entry is not None
    assert list(entry) == ids.tolist()  # chosen (the argmax) first, then by rank
    assert [e.rank for e in entry.values()] == [1, 2, 3]
    assert [e.logprob for e in entry.values()] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(e.decoded_token is None for e in entry.values())


def test_logprobs_ignore_processing_and_rank_the_chosen_token() -> None:
    # allowed_token_ids forces token 1, which is 4th most likely under the raw logits.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    raw = torch.log_softmax(logits, dim=1)[0]
    params = SamplingParams(allowed_token_ids=[1], logprobs=2, repetition_penalty=1.5)
    out = Sampler()(logits.clone(), metadata([row(params, output=[4])], 5))
    assert out.token_ids == [1]
    entry = out.logprobs[0]
    assert entry is not None
    assert list(entry) == [1, 4, 3]
    assert [entry[t].rank for t in (1, 4, 3)] == [4, 1, 2]
    assert [entry[t].logprob for t in (1, 4, 3)] == pytest.approx(
        [float(raw[t]) for t in (1, 4, 3)], abs=1e-6
    )


def test_prompt_logprobs() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 10)  # row i predicts prompt token i + 1; the last row is ignored
    prompt = [5, 2, 9, 0]
    raw = torch.log_softmax(logits, dim=1)
    out = prompt_logprobs(logits, prompt, 2)
    assert len(out) == 4 and out[0] is None
    for i in range(1, 4):
        entry = out[i]
        assert entry is not None
        target = prompt[i]
        expected_rank = int((raw[i - 1] > raw[i - 1, target]).sum()) + 1
        assert entry[target].rank == expected_rank
        assert entry[target].logprob == pytest.approx(float(raw[i - 1, target]), abs=1e-6)
        top = raw[i - 1].topk(2).indices.tolist()
        assert list(entry) == [target] + [t for t in top if t != target]
        assert [entry[t].rank for t in top] == [1, 2]
    assert prompt_logprobs(logits[:0], [7], 3) == [None]


def test_bad_words_single_and_multi_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 10.0]])
    words = [[5], [2, 3, 4]]
    # Token 5 is always banned; 4 only right after the prefix 2, 3.
    assert sample(logits, [row(GREEDY, output=[1], bad_words_token_ids=words)]) == [4]
    assert sample(logits, [row(GREEDY, output=[2], bad_words_token_ids=words)]) == [4]
    assert sample(logits, [row(GREEDY, output=[1, 2, 3], bad_words_token_ids=words)]) == [3]
    assert sample(logits, [row(GREEDY, output=[3, 2], bad_words_token_ids=words)]) == [4]
    assert sample(logits, [row(GREEDY, output=[2, 3], bad_words_token_ids=[[2, 3, 5]])]) == [4]


def test_allowed_token_ids() -> None:
    logits = torch.tensor([LOGITS, LOGITS])
    rows = [row(SamplingParams(temperature=0, allowed_token_ids=[3, 6])), row(GREEDY)]
    assert sample(logits, rows) == [3, 0]
    assert set(draws(SamplingParams(allowed_token_ids=[2, 5, 7]))) == {2, 5, 7}
    out = processed([[1.0, 2.0, 3.0]], [row(SamplingParams(allowed_token_ids=[0, 2]))])
    assert out == [[1.0, float("-inf"), 3.0]]


def test_logit_bias() -> None:
    rows = [row(SamplingParams(logit_bias={0: -2.0, 2: 1.5})), row(GREEDY)]
    assert processed([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], rows) == [
        [-1.0, 2.0, 4.5],
        [1.0, 2.0, 3.0],
    ]
    logits = torch.tensor([LOGITS])
    assert sample(logits, [row(SamplingParams(temperature=0, logit_bias={7: 10}))]) == [7]
    assert sample(logits, [row(SamplingParams(temperature=0, logit_bias={0: -100}))]) == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[1])
    inf = float("-inf")
    before = row(p, output=[4, 4], eos_token_ids=[0])
    assert processed([[5.0, 4.0, 3.0, 2.0, 1.0]], [before]) == [[inf, inf, 3.0, 2.0, 1.0]]
    reached = row(p, output=[4, 4, 4], eos_token_ids=[0])
    assert processed([[5.0, 4.0, 3.0, 2.0, 1.0]], [reached]) == [[5.0, 4.0, 3.0, 2.0, 1.0]]
    assert sample(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]), [before]) == [2]


def _last_token_boost(output_token_ids: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
    logits[len(output_token_ids)] += 100.0
    return logits


@pytest.mark.parametrize("threads", [0, 2])
def test_logits_processors_both_arities(threads: int) -> None:
    seen: list[tuple[str, object, object]] = []
    lock = threading.Lock()

    def three(
        prompt: tuple[int, ...], output: tuple[int, ...], logits: torch.Tensor
    ) -> torch.Tensor:
        with lock:
            seen.append((threading.current_thread().name, prompt, output))
        out = torch.zeros_like(logits)
        out[prompt[0]] = 1.0
        return out

    rows = [
        row(SamplingParams(temperature=0, logits_processors=[_last_token_boost]), output=[0, 0]),
        row(SamplingParams(temperature=0, logits_processors=[three]), prompt=[4, 1], output=[2]),
        row(GREEDY),
        # Chained: three picks token 3, then the boost moves it to len(output) = 1.
        row(
            SamplingParams(temperature=0, logits_processors=[three, _last_token_boost]),
            prompt=[3],
            output=[6],
        ),
    ]
    logits = torch.tensor([LOGITS] * 4)
    assert sample(logits, rows, threads=threads) == [2, 4, 0, 1]
    assert sorted((p, o) for _, p, o in seen) == [((3,), (6,)), ((4, 1), (2,))]
    names = {name for name, _, _ in seen}
    if threads:
        assert all(name.startswith("kvrun-logits") for name in names)
    else:
        assert names == {threading.current_thread().name}


def test_processors_run_before_penalties() -> None:
    def flat(output: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, 2.0)

    p = SamplingParams(logits_processors=[flat], repetition_penalty=2.0, logit_bias={0: 50.0})
    assert processed([[1.0, 1.0, 1.0]], [row(p, prompt=[1], output=[])]) == [[2.0, 1.0, 2.0]]


def test_mixed_truncations_in_one_batch() -> None:
    generator = make_generator(5, torch.empty(0).device)
    plain, narrow = SamplingParams(), SamplingParams(top_k=2, min_p=0.1)
    rows = [row(plain if i % 2 == 0 else narrow, generator=generator) for i in range(4000)]
    tokens = sample(torch.tensor([LOGITS] * 4000), rows)
    assert set(tokens[0::2]) == set(range(8))
    assert set(tokens[1::2]) == {0, 1}


def test_top_p_of_one_keeps_a_tail_that_rounding_hides() -> None:
    probs = torch.softmax(torch.tensor([[20.0, 0.0, 0.0], [20.0, 0.0, 0.0]]), dim=1)
    assert probs[0, 0].item() == 1.0  # float32 rounds the head to 1: the tail's running mass is 1
    kept = apply_top_p(probs, torch.tensor([1.0, 0.5]))
    assert kept[0].tolist() == probs[0].tolist()
    assert kept[1].tolist() == [1.0, 0.0, 0.0]
