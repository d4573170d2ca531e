"""SamplingParams: vLLM's defaults, normalisation, and an error naming the field for each bad value."""

from __future__ import annotations

import functools

import pytest
import torch

from kvrun.errors import KvrunError, RequestError
from kvrun.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1, 0, 0, 1)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, 0, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.bad_words) == ([], [], [])
    assert (p.include_stop_str_in_output, p.ignore_eos, p.max_tokens, p.min_tokens) == (
        False,
        False,
        16,
        0,
    )
    assert (p.logprobs, p.prompt_logprobs, p.detokenize) == (None, None, True)
    assert (p.skip_special_tokens, p.spaces_between_special_tokens) == (True, True)
    assert (p.logits_processors, p.truncate_prompt_tokens) == (None, None)
    assert (p.logit_bias, p.allowed_token_ids) == (None, None)
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


def test_normalisation() -> None:
    # JSON object keys arrive as strings.
    bias = {"50": 5, 7: -1.5}
    p = SamplingParams(stop="###", top_k=-1, logit_bias=bias, seed=3)  # type: ignore[arg-type]
    assert p.stop == ["###"] and p.stop_strings == ["###"]
    assert p.top_k == 0
    assert p.logit_bias == {50: 5.0, 7: -1.5}
    assert p.sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]  # type: ignore[arg-type]


def test_greedy_resets_truncation() -> None:
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_frozen_replace_and_clone() -> None:
    p = SamplingParams(temperature=0.5, stop=["x"])
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    q = p.replace(max_tokens=4)
    assert (q.max_tokens, q.temperature, q.stop, p.max_tokens) == (4, 0.5, ["x"], 16)
    assert p.clone() == p and p.clone() is not p
    with pytest.raises(KvrunError, match=r"^top_p=0\.0 is invalid"):
        p.replace(top_p=0.0)


def test_with_generation_config_adds_eos_ids() -> None:
    p = SamplingParams(stop_token_ids=[5])
    assert p.with_generation_config([5, 9, 11]).stop_token_ids == [5, 9, 11]
    assert p.with_generation_config([5]) is p
    ignoring = SamplingParams(ignore_eos=True)
    assert ignoring.with_generation_config([9]).stop_token_ids == []


def test_processor_arity() -> None:
    def two(out: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        return logits

    def three(prompt: tuple[int, ...], out: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        return logits

    def with_option(prompt: object, out: object, logits: torch.Tensor, k: int = 1) -> torch.Tensor:
        return logits

    p = SamplingParams(
        logits_processors=[two, three, functools.partial(three, ()), with_option, lambda *a: a[-1]]
    )
    assert p.processor_arities == (2, 3, 2, 3, 2)


def _message(field: str, value: object, accepted: str) -> str:
    return f"{field}={value!r} is invalid; accepted: {accepted}"


_TOKENS = "a list of token ids (non-negative ints) or None"
_STRINGS = "a non-empty string, a list of non-empty strings, or None"
_BIAS = "a mapping of token id (int, or its decimal string) to a bias in [-100, 100]"
_PROCS = "a list of callables taking (output_token_ids, logits) or (prompt_token_ids, output_token_ids, logits)"


def _one_arg(logits: torch.Tensor) -> torch.Tensor:
    return logits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, _message("n", 0, "an int >= 1")),
        ({"n": 1.5}, _message("n", 1.5, "an int >= 1")),
        ({"temperature": -0.1}, _message("temperature", -0.1, "a float >= 0")),
        ({"temperature": float("nan")}, _message("temperature", float("nan"), "a float >= 0")),
        ({"temperature": "1"}, _message("temperature", "1", "a float >= 0")),
        ({"top_p": 0.0}, _message("top_p", 0.0, "a float in (0, 1]")),
        ({"top_p": 1.01}, _message("top_p", 1.01, "a float in (0, 1]")),
        ({"top_k": -2}, _message("top_k", -2, "an int >= 1, or 0 or -1 to disable")),
        ({"min_p": -0.01}, _message("min_p", -0.01, "a float in [0, 1]")),
        ({"min_p": 1.5}, _message("min_p", 1.5, "a float in [0, 1]")),
        ({"presence_penalty": 2.5}, _message("presence_penalty", 2.5, "a float in [-2, 2]")),
        ({"frequency_penalty": -2.1}, _message("frequency_penalty", -2.1, "a float in [-2, 2]")),
        ({"repetition_penalty": 0.0}, _message("repetition_penalty", 0.0, "a float > 0")),
        ({"max_tokens": 0}, _message("max_tokens", 0, "an int >= 1 or None")),
        ({"min_tokens": -1}, _message("min_tokens", -1, "an int >= 0")),
        (
            {"min_tokens": 5, "max_tokens": 4},
            _message("min_tokens", 5, "an int in [0, max_tokens=4]"),
        ),
        ({"logprobs": -1}, _message("logprobs", -1, "an int >= 0 or None")),
        ({"prompt_logprobs": -1}, _message("prompt_logprobs", -1, "an int >= 0 or None")),
        ({"logit_bias": {3: 101}}, _message("logit_bias", 101, _BIAS)),
        ({"logit_bias": {3: -100.5}}, _message("logit_bias", -100.5, _BIAS)),
        ({"logit_bias": {"x": 1}}, _message("logit_bias", {"x": 1}, _BIAS)),
        ({"logit_bias": [1]}, _message("logit_bias", [1], _BIAS)),
        ({"seed": 1.0}, _message("seed", 1.0, "a 64-bit int or None")),
        ({"seed": True}, _message("seed", True, "a 64-bit int or None")),
        ({"seed": 2**64}, _message("seed", 2**64, "a 64-bit int or None")),
        ({"logit_bias": {"\u00b2": 1.0}}, _message("logit_bias", {"\u00b2": 1.0}, _BIAS)),
        ({"logit_bias": {"9" * 5000: 1.0}}, _message("logit_bias", {"9" * 5000: 1.0}, _BIAS)),
        ({"stop": ""}, _message("stop", "", _STRINGS)),
        ({"stop": ["ok", ""]}, _message("stop", ["ok", ""], _STRINGS)),
        ({"stop": 5}, _message("stop", 5, _STRINGS)),
        ({"bad_words": [""]}, _message("bad_words", [""], _STRINGS)),
        ({"stop_token_ids": [-1]}, _message("stop_token_ids", -1, _TOKENS)),
        ({"stop_token_ids": 3}, _message("stop_token_ids", 3, _TOKENS)),
        (
            {"allowed_token_ids": []},
            _message("allowed_token_ids", [], "a non-empty list of token ids or None"),
        ),
        ({"allowed_token_ids": ["1"]}, _message("allowed_token_ids", "1", _TOKENS)),
        (
            {"truncate_prompt_tokens": 0},
            _message("truncate_prompt_tokens", 0, "an int >= 1, -1, or None"),
        ),
        (
            {"stop": ["x"], "detokenize": False},
            _message("detokenize", False, "True when stop strings are given"),
        ),
        ({"logits_processors": [5]}, _message("logits_processors", 5, _PROCS)),
        ({"logits_processors": [_one_arg]}, _message("logits_processors", _one_arg, _PROCS)),
        (
            {"logits_processors": _one_arg},
            _message("logits_processors", _one_arg, "a list of callables or None"),
        ),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    # The one error type of request validation: it names the field for the server's 400.
    assert info.value.param == message.split("=")[0]


def test_boundaries_accepted() -> None:
    p = SamplingParams(
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=0.01,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        min_tokens=4,
        max_tokens=4,
        logprobs=0,
        prompt_logprobs=0,
        logit_bias={1: -100, 2: 100},
        truncate_prompt_tokens=-1,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.min_tokens, p.max_tokens) == (-2, 2, 4, 4)
    assert SamplingParams(max_tokens=None, min_tokens=10**6).max_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop_token_ids": [3, 100]}, _message("stop_token_ids", [100], "token ids in [0, 100)")),
        (
            {"allowed_token_ids": [100, 101, 2]},
            _message("allowed_token_ids", [100, 101], "token ids in [0, 100)"),
        ),
        (
            {"logit_bias": {1: 1.0, 250: 2.0}},
            _message("logit_bias", [250], "keys that are token ids in [0, 100)"),
        ),
        ({"logprobs": 21}, _message("logprobs", 21, "an int in [0, 20] (max_logprobs) or None")),
        (
            {"prompt_logprobs": 50},
            _message("prompt_logprobs", 50, "an int in [0, 20] (max_logprobs) or None"),
        ),
    ],
)
def test_verify_against_model(kwargs: dict[str, object], message: str) -> None:
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(KvrunError) as info:
        params.verify(vocab_size=100, max_logprobs=20)
    assert str(info.value) == message


def test_verify_accepts_in_range() -> None:
    SamplingParams(
        stop_token_ids=[99], allowed_token_ids=[0, 99], logit_bias={99: 1}, logprobs=20
    ).verify(vocab_size=100, max_logprobs=20)
