"""Reasoning parsers: <think> split into reasoning and content, whole and streamed (every
split position, so markers cut across pieces), deepseek_r1's and qwen3's differences."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvrun.server.reasoning import REASONING_PARSERS, make_reasoning_parser


def _split(
    name: str, pieces: list[str], prompt: str = "", kwargs: dict[str, Any] | None = None
) -> tuple[str | None, str | None]:
    parser = make_reasoning_parser(name, prompt, kwargs)
    reasoning = content = ""
    for i, piece in enumerate([*pieces, ""]):
        out = parser.feed(piece, final=i == len(pieces))
        reasoning += out.reasoning
        content += out.content
    return reasoning or None, content or None


def _all_ways(
    name: str, text: str, prompt: str = "", kwargs: dict[str, Any] | None = None
) -> tuple[str | None, str | None]:
    """The split of ``text`` whole, which every streamed way must equal."""
    whole = _split(name, [text], prompt, kwargs)
    assert _split(name, list(text), prompt, kwargs) == whole
    for i in range(len(text) + 1):
        assert _split(name, [text[:i], text[i:]], prompt, kwargs) == whole, i
    return whole


CASES = [
    # (parser, reply, prompt, chat_template_kwargs, reasoning, content)
    (
        "deepseek_r1",
        "<think>\nStep 1.</think>\n\nAnswer: 4",
        "",
        None,
        "\nStep 1.",
        "\n\nAnswer: 4",
    ),
    # the template opened <think>: the reply holds only the end
    ("deepseek_r1", "Step 1.</think>Answer: 4", "<think>\n", None, "Step 1.", "Answer: 4"),
    ("deepseek_r1", "Step 1.</think>Answer: 4", "", None, "Step 1.", "Answer: 4"),
    # cut off while thinking: all reasoning
    ("deepseek_r1", "<think>Step 1. Step 2.", "", None, "Step 1. Step 2.", None),
    ("deepseek_r1", "Still thinking </thin", "", None, "Still thinking </thin", None),
    ("deepseek_r1", "<think></think>Answer", "", None, None, "Answer"),
    ("qwen3", "<think>\nStep 1.\n</think>\n\nAnswer: 4", "", None, "\nStep 1.\n", "\n\nAnswer: 4"),
    # qwen3 without <think> in the reply: all content, unless the prompt opened it
    ("qwen3", "Answer: 4", "", None, None, "Answer: 4"),
    ("qwen3", "Step 1.</think>Answer: 4", "", None, None, "Step 1.</think>Answer: 4"),
    (
        "qwen3",
        "Step 1.</think>Answer: 4",
        "...<|im_start|>assistant\n<think>\n",
        None,
        "Step 1.",
        "Answer: 4",
    ),
    ("qwen3", "Hello <think>x</think>", "", None, None, "Hello <think>x</think>"),
    # enable_thinking=False: no reasoning, whatever the reply holds
    (
        "qwen3",
        "<think>x</think>Answer",
        "",
        {"enable_thinking": False},
        None,
        "<think>x</think>Answer",
    ),
    ("qwen3", "<think>x</think>Answer", "", {"enable_thinking": True}, "x", "Answer"),
]


@pytest.mark.parametrize(("name", "text", "prompt", "kwargs", "reasoning", "content"), CASES)
def test_split(
    name: str,
    text: str,
    prompt: str,
    kwargs: dict[str, Any] | None,
    reasoning: str | None,
    content: str | None,
) -> None:
    assert _all_ways(name, text, prompt, kwargs) == (reasoning, content)


def test_registry() -> None:
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match="accepted: deepseek_r1, qwen3"):
        make_reasoning_parser("granite", "", None)


@pytest.mark.parametrize("name", sorted(REASONING_PARSERS))
@pytest.mark.parametrize(
    "text", ["<think>" + "</thin" * 20_000, "<" * 100_000, "<think>" * 15_000 + "</think>" * 10]
)
def test_pathological_reply_returns_within_bound(name: str, text: str) -> None:
    start = time.monotonic()
    _split(name, [text])
    _split(name, [text[i : i + 7] for i in range(0, len(text), 7)])
    assert time.monotonic() - start < 2.0
