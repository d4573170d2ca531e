"""``use_beam_search`` on /v1/completions through the real `openai` client: the n best
beams of a search of width max(n, best_of), the same as the offline ``LLM.beam_search``
on the same weights; bad parameters are 400s naming the field, the engine alive after."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kvrun import LLM, BeamSearchParams
from kvrun.beam_search import BeamSearchOutput
from tests.server.conftest import MAX_MODEL_LEN, Server

PROMPTS = [
    "The capital of France is",
    # the beams end at EOS within MAX_TOKENS
    "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n<|im_start|>assistant\n",
]
MAX_TOKENS = 10
BEAMS = {"extra_body": {"use_beam_search": True}}


@pytest.fixture(scope="module")
def offline() -> Iterator[LLM]:
    """The server's model (the default SmolLM2 GGUF), loaded in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CONFIGURE_LOGGING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
        yield LLM(max_model_len=MAX_MODEL_LEN)


def _expected(llm: LLM, out: BeamSearchOutput, n: int) -> list[tuple[str, str | None]]:
    """Each of the n best beams as the server answers it: the generated text, special
    tokens skipped, without the EOS; and the finish reason."""
    tokenizer = llm.get_tokenizer()
    answers = []
    for seq in out.sequences[:n]:
        ids = seq.generated_token_ids
        if seq.finish_reason == "stop":
            ids = ids[:-1]
        answers.append((tokenizer.decode(ids), seq.finish_reason))
    return answers


def test_completion_beams_equal_offline(server: Server, model_name: str, offline: LLM) -> None:
    reference = offline.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    answer = server.client().completions.create(
        model=model_name, prompt=PROMPTS, max_tokens=MAX_TOKENS, n=2, best_of=3, **BEAMS
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    got = [(c.text, c.finish_reason) for c in answer.choices]
    want = [a for out in reference for a in _expected(offline, out, 2)]
    assert got == want
    assert {reason for _, reason in want} == {"stop", "length"}  # both ends are exercised
    lengths = [len(s.generated_token_ids) for out in reference for s in out.sequences[:2]]
    assert answer.usage is not None and answer.usage.completion_tokens == sum(lengths)
    assert len({c.text for c in answer.choices[:2]}) == 2  # two different beams


def test_beam_logprobs_echo_and_length_penalty(
    server: Server, model_name: str, offline: LLM
) -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, length_penalty=0.0)
    [reference] = offline.beam_search(PROMPTS[1], params)
    answer = server.client().completions.create(
        model=model_name,
        prompt=PROMPTS[1],
        max_tokens=MAX_TOKENS,
        n=2,
        logprobs=2,
        echo=True,
        extra_body={"use_beam_search": True, "length_penalty": 0.0},
    )
    for choice, seq in zip(answer.choices, reference.sequences, strict=True):
        [(text, reason)] = _expected(offline, BeamSearchOutput([seq]), 1)
        assert choice.text == PROMPTS[1] + text and choice.finish_reason == reason
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        generated = choice.logprobs.token_logprobs[-len(seq.generated_token_ids) :]
        assert sum(generated) == pytest.approx(seq.cum_logprob, abs=1e-4)
        assert all(top is not None and len(top) >= 2 for top in choice.logprobs.top_logprobs[-1:])


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"stream": True}, "stream", "not supported with use_beam_search"),
    ({"n": 2, "best_of": 1}, "best_of", "best_of=1 is invalid; accepted: an int >= n=2"),
    ({"best_of": 11}, "best_of", r"best_of=11 is invalid; accepted: an int in [1, 10]"),
    ({"n": 11}, "n", r"n=11 is invalid; accepted: an int in [1, 10]"),
    ({"length_penalty": "long"}, "length_penalty", "field 'length_penalty' is invalid"),
    ({"length_penalty": float("inf")}, "length_penalty", "length_penalty=inf is invalid"),
    ({"stop": ["."]}, "stop", "stop is not supported with use_beam_search"),
    ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", "maximum context length is 1024"),
    ({"use_beam_search": "yes"}, "use_beam_search", "field 'use_beam_search' is invalid"),
]


@pytest.mark.parametrize(("fields", "param", "message"), BAD)
def test_bad_beam_params_are_400s_naming_the_field(
    server: Server, fields: dict[str, Any], param: str, message: str
) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "use_beam_search": True, **fields}
    raw = json.dumps(body).encode()  # Python's JSON spells inf as Infinity, as JS does
    with server.http() as http:
        answer = http.post(
            "/v1/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def test_beam_fields_without_beam_search(server: Server, model_name: str) -> None:
    with server.http() as http:
        answer = http.post(
            "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, "length_penalty": 2.0}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "length_penalty"
        # best_of other than n is still refused for sampling
        answer = http.post("/v1/completions", json={"prompt": PROMPTS[0], "best_of": 2})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "best_of"
    # the engine is alive and nothing is left running
    done = server.client().completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=2, temperature=0.0
    )
    assert done.choices[0].finish_reason == "length"
    server.wait_metric("vllm:num_requests_running", 0.0)


def test_chat_beams_equal_offline(server: Server, model_name: str, offline: LLM) -> None:
    """Chat: the template's prompt, a search of width n, the n best beams as choices."""
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    tokenizer = offline.get_tokenizer()
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        add_special_tokens=False,
    )
    [reference] = offline.beam_search(
        [prompt], BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS)
    )
    answer = server.client().chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, n=2, **BEAMS
    )
    got = [(c.message.content, c.finish_reason) for c in answer.choices]
    assert got == _expected(offline, reference, 2)
    with pytest.raises(Exception, match="length_penalty"):
        server.client().chat.completions.create(
            model=model_name,
            messages=messages,
            max_tokens=2,
            extra_body={"length_penalty": 0.5},
        )
