"""`kvrun serve --runner pooling --enable-lora` (issue 18): /v1/embeddings with ``model``
naming an adapter answers the hidden states of transformers with the adapter merged by
peft (cos > 0.9999), the base model's without it; the answer names the model it used.
The server is conftest's ``pooler``, shared with test_pooling.py (it stops with status 0
at the end of the session)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tests.server.conftest import Server
from tests.support.lora import merged_checkpoint

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [10, 20, 30, 40]]


def _reference(directory: Path) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
    with torch.no_grad():
        return [
            F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
            for ids in PROMPTS
        ]


def test_pooling_server_embeds_with_an_adapter(
    pooler: Server, pooling_base: Path, pooling_adapter: Path
) -> None:
    """conftest's ``pooler``: ``--runner pooling --enable-lora``, the adapter ``adapted``."""
    for model, directory in (
        ("adapted", merged_checkpoint(pooling_base, pooling_adapter)),
        ("base", pooling_base),
    ):
        with pooler.http() as http:
            answer = http.post("/v1/embeddings", json={"model": model, "input": PROMPTS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model
        for item, want in zip(answer.json()["data"], _reference(directory), strict=True):
            got = torch.tensor(item["embedding"])
            assert float(F.cosine_similarity(got, want, dim=0)) > 0.9999
    with pooler.http() as http:
        refused = http.post(
            "/v1/completions", json={"model": "adapted", "prompt": PROMPTS[0], "max_tokens": 2}
        )
    assert refused.status_code == 400 and "runner='generate'" in refused.json()["error"]["message"]
