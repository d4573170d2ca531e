"""/v1/embeddings, /pooling, /score and /rerank on a real `kvrun serve --runner pooling`
(conftest's ``pooler``: a tiny random Qwen2 in float32), through the real `openai`
client where it has the route, checked against transformers."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from kvrun.tokenizer import load_tokenizer_from_dir
from tests.server.conftest import Server, launch

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "I like green tea."]


@pytest.fixture(scope="module")
def reference(pooling_base: Path) -> dict[str, torch.Tensor]:
    """transformers' last-token hidden state of each text, normalised (vLLM's default
    embedding of a causal LM), on the pooling server's base model."""
    tokenizer = load_tokenizer_from_dir(pooling_base)
    model = AutoModel.from_pretrained(pooling_base, dtype=torch.float32)
    out = {}
    with torch.no_grad():
        for text in [*TEXTS, "Where is Paris?"]:
            hidden = model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0, -1]
            out[text] = F.normalize(hidden, dim=-1)
    return out


def _cos(a: object, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(torch.tensor(a, dtype=torch.float32), b, dim=0))


def _name(srv: Server) -> str:
    with srv.http() as http:
        name: str = http.get("/v1/models").json()["data"][0]["id"]
    return name


def test_embeddings_match_transformers(pooler: Server, reference: dict[str, torch.Tensor]) -> None:
    client = pooler.client()
    out = client.embeddings.create(model=_name(pooler), input=TEXTS, encoding_format="float")
    assert [d.index for d in out.data] == [0, 1, 2]
    for item, text in zip(out.data, TEXTS, strict=True):
        assert _cos(item.embedding, reference[text]) > 0.9999
    assert out.usage.prompt_tokens == out.usage.total_tokens > 0
    # one text, and base64 (what the openai client asks for by default)
    single = client.embeddings.create(model=_name(pooler), input=TEXTS[0])
    assert _cos(single.data[0].embedding, reference[TEXTS[0]]) > 0.9999
    with pooler.http() as http:
        raw = http.post(
            "/v1/embeddings",
            json={"input": TEXTS[1], "encoding_format": "base64"},
        ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert _cos(decoded.tolist(), reference[TEXTS[1]]) > 0.9999
    # inputs as token ids: one prompt, and a list of prompts
    with pooler.http() as http:
        ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in TEXTS[:2]]
        for body in ({"input": ids[0]}, {"input": ids}):
            data = http.post("/v1/embeddings", json=body).json()["data"]
            for item, text in zip(data, TEXTS, strict=False):
                assert _cos(item["embedding"], reference[text]) > 0.9999


def test_pooling_score_and_rerank(pooler: Server, reference: dict[str, torch.Tensor]) -> None:
    query = "Where is Paris?"
    want = [float(F.cosine_similarity(reference[query], reference[t], dim=0)) for t in TEXTS]
    with pooler.http() as http:
        pooled = http.post("/pooling", json={"input": TEXTS}).json()
        assert [d["object"] for d in pooled["data"]] == ["pooling"] * 3
        assert _cos(pooled["data"][2]["data"], reference[TEXTS[2]]) > 0.9999
        for route in ("/score", "/v1/score"):
            scores = http.post(route, json={"text_1": query, "text_2": TEXTS}).json()
            got = [d["score"] for d in scores["data"]]
            assert got == pytest.approx(want, abs=1e-4), route
        for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
            ranked = http.post(route, json={"query": query, "documents": TEXTS, "top_n": 2}).json()
            order = sorted(range(3), key=lambda i: -want[i])[:2]
            assert [r["index"] for r in ranked["results"]] == order, route
            assert ranked["results"][0]["document"]["text"] == TEXTS[order[0]]
            assert ranked["results"][0]["relevance_score"] == pytest.approx(
                want[order[0]], abs=1e-4
            )


def test_refusals_name_the_field(pooler: Server, server: Server) -> None:
    client = pooler.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=_name(pooler), input="Hi", dimensions=8)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "not trained for shortened embeddings" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="runner='generate'"):
        client.completions.create(model=_name(pooler), prompt="Hi", max_tokens=2)
    # a generating server embeds as well (the same default pooler)
    alongside = server.client().embeddings.create(model=_name(server), input=TEXTS[0])
    assert len(alongside.data[0].embedding) == 576
    with pooler.http() as http:
        bad = http.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_1"
        assert http.post("/v1/embeddings", json={"input": []}).status_code == 400
        assert http.post("/rerank", json={"query": "q", "documents": []}).status_code == 400
        # the same API-key rule as every route
        for route in ("/v1/embeddings", "/pooling", "/score", "/rerank"):
            answer = httpx.post(f"{pooler.base_url}{route}", json={"input": "Hi"})
            assert answer.status_code == 401, route
        assert http.post("/v1/embeddings", json={"input": "still alive"}).status_code == 200


def test_classify_route(classifier_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    # float32: compared with transformers' float32 to 1e-5 (auto may be bfloat16)
    args = ["--model", str(classifier_dir), "--dtype", "float32"]
    srv = launch(tmp_path / "classifier", args=args)
    try:
        with srv.http() as http:
            answer = http.post("/classify", json={"input": TEXTS[:2]}).json()
            tokens = [
                http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in TEXTS[:2]
            ]
            embeddings = http.post("/v1/embeddings", json={"input": "Hi"})
        assert embeddings.status_code == 400 and "is a classifier" in embeddings.text
        model = AutoModelForSequenceClassification.from_pretrained(
            classifier_dir, dtype=torch.float32
        )
        for item, ids in zip(answer["data"], tokens, strict=True):
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0].softmax(-1)
            assert item["num_classes"] == 3
            assert item["probs"] == pytest.approx(want.tolist(), abs=1e-5)
            assert item["label"] == ("negative", "neutral", "positive")[int(want.argmax())]
    finally:
        srv.stop()
        srv.cleanup()
