"""Completions and chat through the real `openai` client against a real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, Server

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def _tokenize(server: Server, **body: object) -> list[int]:
    with server.http() as http:
        answer = http.post("/tokenize", json=body)
    assert answer.status_code == 200, answer.text
    tokens: list[int] = answer.json()["tokens"]
    return tokens


def test_models(server: Server, model_name: str) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [model_name]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == "kvrun"
    with server.http() as http:
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


def test_completion_text_and_usage(server: Server, model_name: str) -> None:
    out = server.client().completions.create(
        model=model_name, prompt=PROMPT, max_tokens=8, **GREEDY
    )
    assert out.id.startswith("cmpl-")
    assert out.object == "text_completion"
    assert out.model == model_name
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(_tokenize(server, prompt=PROMPT))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    # greedy is deterministic, and a prompt as token ids gives the same text
    again = server.client().completions.create(
        model=model_name, prompt=_tokenize(server, prompt=PROMPT), max_tokens=8, **GREEDY
    )
    assert again.choices[0].text == choice.text


def test_completion_without_model_field_and_default_max_tokens(server: Server) -> None:
    with server.http() as http:
        body = http.post("/v1/completions", json={"prompt": PROMPT, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 16  # OpenAI's default


def test_completion_logprobs(server: Server, model_name: str) -> None:
    out = server.client().completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is not None and 1 <= len(top) <= 4
        assert top[token] == logprob
        assert logprob == max(top.values())  # greedy picks the most likely token
        assert logprob <= 0.0


def test_completion_echo(server: Server, model_name: str) -> None:
    out = server.client().completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, echo=True, logprobs=1, **GREEDY
    )
    plain = server.client().completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, **GREEDY
    )
    choice = out.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    n_prompt = len(_tokenize(server, prompt=PROMPT))
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def test_several_prompts_and_n(server: Server, model_name: str) -> None:
    out = server.client().completions.create(
        model=model_name,
        prompt=["One, two,", "Red, green,"],
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage is not None and out.usage.completion_tokens == 20
    again = server.client().completions.create(
        model=model_name,
        prompt=["One, two,", "Red, green,"],
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_seed_reproduces_and_differs(server: Server, model_name: str) -> None:
    def sample(seed: int) -> str:
        out = server.client().completions.create(
            model=model_name,
            prompt="Once upon a time",
            max_tokens=24,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_stop_string(server: Server, model_name: str) -> None:
    client = server.client()
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=24, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra is not None
    assert cut.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=24, stop=[stop], stream=True, **GREEDY
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream_matches_and_reports_usage(server: Server, model_name: str) -> None:
    client = server.client()
    whole = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, **GREEDY)
    stream = client.completions.create(
        model=model_name,
        prompt=PROMPT,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_sse_framing_ends_with_done(server: Server) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "temperature": 0.0}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(answer.iter_bytes()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_streamed_multibyte_text_equals_final_text(server: Server, model_name: str) -> None:
    # The byte tokens of "漢" (E6 BC A2) split one character over several tokens.
    with server.http() as http:
        vocab_ids = http.post("/tokenize", json={"prompt": "漢漢", "add_special_tokens": False})
    ids = sorted(set(vocab_ids.json()["tokens"]))
    client = server.client()
    kwargs = {
        "model": model_name,
        "prompt": "Write one Chinese character:",
        "max_tokens": 9,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True, "allowed_token_ids": ids},
    }
    whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.usage.completion_tokens == 9


def test_chat(server: Server, model_name: str) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_completion_tokens=8,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert out.id.startswith("chatcmpl-")
    assert out.object == "chat.completion"
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    prompt_ids = _tokenize(server, messages=messages)
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 8
    # the chat template output, sent as token ids, generates the same text
    same = client.completions.create(model=model_name, prompt=prompt_ids, max_tokens=8, **GREEDY)
    assert same.choices[0].text == choice.message.content
    # content parts are joined into the same message
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    again = client.chat.completions.create(
        model=model_name,
        messages=parts,
        max_tokens=8,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert again.choices[0].message.content == choice.message.content


def test_chat_stream_logprobs_and_usage(server: Server, model_name: str) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(
        model=model_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        **GREEDY,
    )
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for item in content:
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == item.logprob  # greedy: the top token
        ranks = [t.logprob for t in item.top_logprobs]
        assert ranks == sorted(ranks, reverse=True)
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=6,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == (
        whole.choices[0].message.content
    )
    streamed_lp = [t for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert [t.token for t in streamed_lp] == [t.token for t in content]
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_chat_n_and_seed(server: Server, model_name: str) -> None:
    client = server.client()
    kwargs = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Tell me a word."}],
        "max_tokens": 8,
        "n": 3,
        "temperature": 1.0,
        "seed": 99,
    }
    a = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_concurrent_requests_all_complete(server: Server, model_name: str) -> None:
    async def run() -> list[str]:
        client = server.async_client()
        outs = await asyncio.gather(
            *(
                client.completions.create(
                    model=model_name, prompt=f"{i} + {i} =", max_tokens=6, **GREEDY
                )
                for i in range(6)
            )
        )
        await client.close()
        return [o.choices[0].text for o in outs]

    texts = asyncio.run(run())
    # each equals the same request made alone: batching does not change greedy output
    alone = server.client().completions.create(
        model=model_name, prompt="3 + 3 =", max_tokens=6, **GREEDY
    )
    assert texts[3] == alone.choices[0].text


def test_tokenize_detokenize(server: Server) -> None:
    with server.http() as http:
        tok = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
        body = tok.json()
        assert body["count"] == len(body["tokens"])
        assert body["max_model_len"] == MAX_MODEL_LEN
        assert len(body["token_strs"]) == body["count"]
        detok = http.post("/detokenize", json={"tokens": body["tokens"]})
        assert detok.json() == {"prompt": "Hello world"}


@pytest.mark.parametrize("path", ["/health", "/ping"])
def test_liveness(server: Server, path: str) -> None:
    answer = httpx.get(server.base_url + path)
    assert answer.status_code == 200


def test_version(server: Server) -> None:
    from kvrun import __version__

    assert httpx.get(server.base_url + "/version").json() == {"version": __version__}
