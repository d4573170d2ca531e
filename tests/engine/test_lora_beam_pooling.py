"""LoRA adapters on beam search and on the pooling runner (issue 18), against transformers
with the adapter merged by peft (float32, random tiny checkpoints).

Beam search: ``LLM.beam_search(..., lora_request=...)`` returns transformers' beams of the
merged model, in order, with their cumulative logprobs; a prompt searched without an
adapter in the same call returns the base model's. Pooling: ``LLM(runner="pooling",
enable_lora=True)``'s embeddings equal the merged model's pooled hidden states (the same
text with and without the adapter in one batch: the prefix cache keeps them apart), and a
classifier's probabilities with an adapter equal the merged classifier's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvrun import LLM, BeamSearchParams
from kvrun.lora.request import LoRARequest
from tests.engine.test_beam_search import RANDOM, RANDOM_PROMPTS, assert_matches, hf_beam_search
from tests.support.lora import make_adapter, merged_checkpoint

# several KV blocks each, so that a second pass finds them in the prefix cache
TEXTS = ["The cat sat on the mat. " * 12, "Paris is the capital of France, on the Seine. " * 8]


def _llm(model: Path, **kwargs: object) -> LLM:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CONFIGURE_LOGGING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.1")
        return LLM(model=str(model), dtype="float32", enable_lora=True, max_loras=2, **kwargs)


# --- beam search -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beam_base(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", **RANDOM)  # the one tests/engine/test_beam_search uses


@pytest.fixture(scope="module")
def beam_adapter(beam_base: Path) -> Path:
    return make_adapter(beam_base, seed=21, r=8, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def beam_llm(beam_base: Path) -> Iterator[LLM]:
    yield _llm(beam_base, max_model_len=128)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_with_an_adapter_equals_merged_transformers(
    beam_llm: LLM, beam_base: Path, beam_adapter: Path, length_penalty: float
) -> None:
    llm = beam_llm
    lora = LoRARequest("beams", 1, str(beam_adapter))
    k, steps = 3, 8
    params = BeamSearchParams(beam_width=k, max_tokens=steps, length_penalty=length_penalty)
    merged = merged_checkpoint(beam_base, beam_adapter)
    # one call: the first prompt with the adapter, the second on the base model
    got = llm.beam_search(RANDOM_PROMPTS, params, lora_request=[lora, None])
    want_adapted = hf_beam_search(merged, RANDOM_PROMPTS[:1], k, length_penalty, steps)
    want_base = hf_beam_search(beam_base, RANDOM_PROMPTS[1:], k, length_penalty, steps)
    assert_matches(got, [*want_adapted, *want_base], RANDOM_PROMPTS)
    # the adapter changes the search: the base model's beams of the first prompt differ
    [plain] = hf_beam_search(beam_base, RANDOM_PROMPTS[:1], k, length_penalty, steps)
    assert [ids for ids, _ in plain] != [ids for ids, _ in want_adapted[0]]
    # one LoRARequest for every prompt
    both = llm.beam_search(RANDOM_PROMPTS, params, lora_request=lora)
    want_both = hf_beam_search(merged, RANDOM_PROMPTS, k, length_penalty, steps)
    assert_matches(both, want_both, RANDOM_PROMPTS)
    assert not llm.llm_engine.has_unfinished_requests()


# --- pooling -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool_base(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("qwen2", seed=5, num_layers=2)  # tests/server/test_lora's base


@pytest.fixture(scope="module")
def pool_adapter(pool_base: Path) -> Path:
    return make_adapter(pool_base, seed=1, r=8, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def embedder(pool_base: Path) -> Iterator[LLM]:
    yield _llm(pool_base, runner="pooling", max_model_len=256)


def _last_hidden(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' normalised last-token hidden state (after the final norm)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return [
            F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
            for ids in prompts
        ]


def test_embeddings_with_an_adapter_equal_merged_transformers(
    embedder: LLM, pool_base: Path, pool_adapter: Path
) -> None:
    lora = LoRARequest("embed", 1, str(pool_adapter))
    tokenizer = embedder.get_tokenizer()
    prompts = [tokenizer.encode(t) for t in TEXTS]
    adapted = _last_hidden(merged_checkpoint(pool_base, pool_adapter), prompts)
    base = _last_hidden(pool_base, prompts)
    # each text with the adapter and without, in one batch; then again (prefix cache hits)
    for _ in range(2):
        outs = embedder.embed(
            [*TEXTS, *TEXTS], lora_request=[lora, lora, None, None], use_tqdm=False
        )
        got = [torch.tensor(o.outputs.embedding) for o in outs]
        for vector, ref in zip(got, [*adapted, *base], strict=True):
            assert float(F.cosine_similarity(vector, ref, dim=0)) > 0.9999
    assert embedder.llm_engine.scheduler.stats.prefix_cache_hits > 0
    for a, b in zip(adapted, base, strict=True):  # the adapter matters
        assert float(F.cosine_similarity(a, b, dim=0)) < 0.999
    # encode and score take it too
    [encoded] = embedder.encode(TEXTS[0], lora_request=lora, use_tqdm=False)
    assert float(F.cosine_similarity(encoded.outputs.data, adapted[0], dim=0)) > 0.9999
    [score] = embedder.score(TEXTS[0], TEXTS[1], lora_request=lora, use_tqdm=False)
    assert score.outputs.score == pytest.approx(
        float(F.cosine_similarity(adapted[0], adapted[1], dim=0)), abs=1e-4
    )
    assert not embedder.llm_engine.has_unfinished_requests()


def test_a_classifier_with_an_adapter_equals_merged_transformers(classifier_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    cls = "AutoModelForSequenceClassification"
    adapter = make_adapter(
        classifier_dir, seed=7, r=4, targets=("q_proj", "o_proj"), model_class=cls
    )
    llm = _llm(classifier_dir, max_model_len=128)  # runner auto: pooling
    lora = LoRARequest("cls", 1, str(adapter))
    outs = llm.classify([TEXTS[0], TEXTS[0]], lora_request=[lora, None], use_tqdm=False)
    models = [
        AutoModelForSequenceClassification.from_pretrained(
            str(merged_checkpoint(classifier_dir, adapter, cls)), dtype=torch.float32
        ),
        AutoModelForSequenceClassification.from_pretrained(
            str(classifier_dir), dtype=torch.float32
        ),
    ]
    wants = []
    with torch.no_grad():
        for out, model in zip(outs, models, strict=True):
            want = model(torch.tensor([out.prompt_token_ids])).logits[0].softmax(-1)
            assert torch.allclose(torch.tensor(out.outputs.probs), want, atol=1e-5)
            wants.append(want)
    assert not torch.allclose(wants[0], wants[1], atol=1e-3)  # the adapter matters
