"""The pooling runner on real weights: embeddings equal transformers' pooled hidden states
of the same weights, scores are their cosines, and pooling requests share the scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from kvrun import LLM, PoolingParams, SamplingParams
from kvrun.errors import ConfigError, RequestError
from tests.support.engine import make_engine

TEXTS = [
    "The cat sat on the mat.",
    "A dog barked at the mailman all morning long, and nobody knew why.",
    "Paris is the capital of France.",
    "def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_hf_dir: Path) -> Any:
    """transformers' SmolLM2 base model (no LM head), loaded once for the module."""
    return AutoModel.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


def _reference(model: Any, prompts: list[list[int]], pooling: str) -> list[torch.Tensor]:
    """transformers' final hidden states (after the last norm), pooled and normalised."""
    out = []
    with torch.no_grad():
        for ids in prompts:
            hidden = model(torch.tensor([ids])).last_hidden_state[0]
            vector = {"LAST": hidden[-1], "MEAN": hidden.mean(dim=0), "CLS": hidden[0]}[pooling]
            out.append(F.normalize(vector, dim=-1))
    return out


@pytest.fixture(scope="module")
def embedder(smollm2_hf_dir: Path) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
        yield LLM(model=str(smollm2_hf_dir), runner="pooling", dtype="float32", max_model_len=512)


def test_embeddings_equal_transformers_last_token(embedder: LLM, hf_smollm2: Any) -> None:
    tokenizer = embedder.get_tokenizer()
    prompts = [tokenizer.encode(t) for t in TEXTS]
    want = _reference(hf_smollm2, prompts, "LAST")
    outs = embedder.embed(TEXTS, use_tqdm=False)
    for out, ref, ids in zip(outs, want, prompts, strict=True):
        got = torch.tensor(out.outputs.embedding)
        assert out.prompt_token_ids == ids
        assert got.shape == ref.shape and abs(float(got.norm()) - 1.0) < 1e-5
        assert float(F.cosine_similarity(got, ref, dim=0)) > 0.9999


def test_encode_and_a_second_pass_over_cached_prefixes_agree(embedder: LLM) -> None:
    texts = [t * 4 for t in TEXTS]  # several KV blocks each
    first = embedder.encode(texts, use_tqdm=False)
    hits = embedder.llm_engine.scheduler.stats.prefix_cache_hits
    again = embedder.encode(texts[::-1], use_tqdm=False)  # served from the prefix cache now
    assert embedder.llm_engine.scheduler.stats.prefix_cache_hits > hits
    for a, b in zip(first, again[::-1], strict=True):
        assert torch.allclose(a.outputs.data, b.outputs.data, atol=1e-5)


def test_scores_are_cosines_of_embeddings(embedder: LLM) -> None:
    query = "Where is Paris?"
    scores = embedder.score(query, TEXTS, use_tqdm=False)
    vectors = [
        torch.tensor(o.outputs.embedding) for o in embedder.embed([query, *TEXTS], use_tqdm=False)
    ]
    for out, vector in zip(scores, vectors[1:], strict=True):
        assert out.outputs.score == pytest.approx(
            float(F.cosine_similarity(vectors[0], vector, dim=0)), abs=1e-5
        )
    pairwise = embedder.score(TEXTS[:2], TEXTS[2:], use_tqdm=False)
    assert len(pairwise) == 2
    with pytest.raises(ValueError, match="give one text_1 or as many as text_2"):
        embedder.score(TEXTS[:2], TEXTS[:3], use_tqdm=False)


def test_the_pooling_runner_refuses_generation_and_bad_dimensions(embedder: LLM) -> None:
    with pytest.raises(RequestError, match="runner='generate'"):
        embedder.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(RequestError, match="not trained for shortened embeddings") as caught:
        embedder.embed("Hi", PoolingParams(dimensions=8), use_tqdm=False)
    assert caught.value.param == "dimensions"
    assert not embedder.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("pooling", ["MEAN", "CLS"])
def test_other_poolings_over_chunks(smollm2_hf_dir: Path, hf_smollm2: Any, pooling: str) -> None:
    """MEAN and CLS read every position: prompts split in chunks over several steps,
    batched together, pool every row once (and skip the prefix cache)."""
    engine = make_engine(
        smollm2_hf_dir,
        runner="pooling",
        pooler_config={"pooling_type": pooling},
        max_model_len=128,
        num_kv_blocks=9,
        max_num_batched_tokens=32,
        max_num_seqs=4,
    )
    long_texts = [t * 3 for t in TEXTS]
    prompts = [engine.tokenizer.encode(t) for t in long_texts]
    for i, ids in enumerate(prompts):
        engine.add_pooling_request(str(i), ids, PoolingParams())
    got: dict[str, torch.Tensor] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            assert delta.pooled is not None and delta.finished and not delta.sequences
            got[delta.request_id] = delta.pooled
    want = _reference(hf_smollm2, prompts, pooling)
    for i, ref in enumerate(want):
        assert float(F.cosine_similarity(got[str(i)], ref, dim=0)) > 0.9999


def test_matryoshka_dimensions(random_checkpoint: object, smollm2_hf_dir: Path) -> None:
    model_dir = random_checkpoint(  # type: ignore[operator]
        "llama", seed=3, extra_config={"matryoshka_dimensions": [16, 32]}
    )
    engine = make_engine(model_dir, runner="pooling", max_model_len=128, num_kv_blocks=16)
    ids = engine.tokenizer.encode("Shorter embeddings")
    engine.add_pooling_request("cut", ids, PoolingParams(dimensions=16))
    deltas = []
    while engine.has_unfinished_requests():
        deltas.extend(engine.step())
    (delta,) = deltas
    assert delta.pooled is not None and delta.pooled.shape == (16,)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
    want = F.normalize(hidden[:16], dim=-1)
    assert float(F.cosine_similarity(delta.pooled, want, dim=0)) > 0.9999
    with pytest.raises(RequestError, match="one of 16, 32"):
        engine.add_pooling_request("bad", ids, PoolingParams(dimensions=20))


def test_runner_options_are_checked(smollm2_hf_dir: Path) -> None:
    with pytest.raises(ConfigError, match="runner 'embedding' is not known"):
        make_engine(smollm2_hf_dir, runner="embedding")
    with pytest.raises(ConfigError, match="pooling_type 'max' is not supported"):
        make_engine(smollm2_hf_dir, runner="pooling", pooler_config={"pooling_type": "max"})
    with pytest.raises(ConfigError, match="applies to the pooling runner"):
        make_engine(smollm2_hf_dir, convert="embed", max_model_len=128)


def test_a_generating_engine_embeds_in_the_same_steps(
    smollm2_hf_dir: Path, hf_smollm2: Any
) -> None:
    """Embeddings share the scheduler and the steps with generation: each step below
    batches both kinds, and neither changes the other's result."""
    from tests.support.engine import run_all

    engine = make_engine(smollm2_hf_dir, max_model_len=256, num_kv_blocks=64)
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(t) for t in TEXTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in run_all(engine, prompts[:2], greedy)]
    for i, ids in enumerate(prompts[:2]):
        engine.add_request(f"gen-{i}", ids, greedy)
    for i, ids in enumerate(prompts[2:]):
        engine.add_pooling_request(f"emb-{i}", ids, PoolingParams())
    mixed_steps = 0
    tokens: dict[str, list[int]] = {"gen-0": [], "gen-1": []}
    pooled: dict[str, torch.Tensor] = {}
    while engine.has_unfinished_requests():
        deltas = engine.step()
        kinds = {d.pooled is not None for d in deltas}
        mixed_steps += kinds == {True, False}
        for delta in deltas:
            if delta.pooled is not None:
                pooled[delta.request_id] = delta.pooled
            for seq in delta.sequences:
                tokens[delta.request_id].extend(seq.token_ids)
    assert mixed_steps >= 1
    assert [tokens["gen-0"], tokens["gen-1"]] == alone
    want = _reference(hf_smollm2, prompts[2:], "LAST")
    for i, ref in enumerate(want):
        assert float(F.cosine_similarity(pooled[f"emb-{i}"], ref, dim=0)) > 0.9999


def test_a_classifier_equals_transformers(classifier_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.1")
        llm = LLM(model=str(classifier_dir), dtype="float32", max_model_len=256)  # runner auto
    assert llm.llm_engine.config.runner == "pooling"
    outs = llm.classify(TEXTS, use_tqdm=False)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, dtype=torch.float32)
    with torch.no_grad():
        for out in outs:
            want = model(torch.tensor([out.prompt_token_ids])).logits[0].softmax(-1)
            assert out.outputs.num_classes == 3
            assert torch.allclose(torch.tensor(out.outputs.probs), want, atol=1e-5)
    with pytest.raises(RequestError, match="is a classifier"):
        llm.embed("Hi", use_tqdm=False)
    with pytest.raises(ConfigError, match="runs only as a pooling model"):
        make_engine(classifier_dir, runner="generate", max_model_len=128)


def test_an_embedding_model_refuses_classify(embedder: LLM) -> None:
    with pytest.raises(RequestError, match="needs a \\*ForSequenceClassification model"):
        embedder.classify("Hi", use_tqdm=False)
