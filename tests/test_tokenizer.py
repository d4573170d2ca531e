"""Tokenizers equal transformers' on the same files; chat templates render the same text
in a sandbox; streaming detokenization equals full decoding."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import transformers

from kvrun.loader import load_checkpoint
from kvrun.testing.checkpoints import build_gguf_from_hf
from kvrun.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
    chat_template,
    load_tokenizer,
    load_tokenizer_from_dir,
)
from kvrun.tokenizer.core import COMPILED_TEMPLATES
from tests.support.checkpoints import cached_build

TEXTS = [
    "Hello world",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\n",
    "\n\n\nthree newlines",
    "x=12345;y=-7",
    "In 2024, 3.14159 and 1,000,000 people",
    " 99 bottles of beer",
    "abc123def456",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\n<|endoftext|>",
    "text<|im_end|>more text",
    "<repo_name>kvrun<file_sep>main.py",
    "日本語のテキストです。",
    "中文测试，标点符号！",
    "한국어 문장입니다",
    "emoji 🎉🚀👩‍👩‍👧‍👦 flags 🇫🇷",
    "naïve café résumé façade",
    "Ελληνικά και русский текст",
    "مرحبا بالعالم",
    "don't I'll we've they're it's",
    "DON'T SHOUT",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, {"nested": null}]}',
    "https://example.com/path?query=1&b=2#frag",
    "\u200b zero width \u00a0 nbsp",
    "a" * 60,
    "   ",
    "",
    "mixed\u3000ideographic space",
    "math: ∑ x² ≤ ∞ and → arrows",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
    [{"role": "user", "content": "多语言 test\nwith newline"}],
]


@pytest.fixture(scope="module")
def gguf_pair(smollm2_gguf_path: Path) -> tuple[Tokenizer, Any]:
    ours = load_tokenizer(
        load_checkpoint(str(smollm2_gguf_path), hf_hub_offline=True, use_modelscope=False)
    )
    theirs = transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name
    )
    return ours, theirs


@pytest.fixture(scope="module")
def dir_pair(smollm2_hf_dir: Path) -> tuple[Tokenizer, Any]:
    ours = load_tokenizer(
        load_checkpoint(str(smollm2_hf_dir), hf_hub_offline=True, use_modelscope=False)
    )
    return ours, transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))


@pytest.fixture(params=["gguf", "dir"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any]:
    fixture: tuple[Tokenizer, Any] = request.getfixturevalue(f"{request.param}_pair")
    return fixture


# --- encode / decode ------------------------------------------------------------------


def test_encode_decode_equal_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = pair
    assert len(TEXTS) >= 30
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    assert ours.encode("12345") == [
        33,
        34,
        35,
        36,
        37,
    ]  # digits stay single, as SmolLM2 splits them
    assert ours.encode("<|im_start|>user") == [1, 4093]


def test_special_ids_and_vocab(pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = pair
    assert ours.vocab_size == len(theirs) == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == frozenset({2})
    assert ours.special_tokens == theirs.special_tokens_map
    assert ours.all_special_ids == frozenset(range(17))
    ids = ours.encode("Hello 世界 <|im_end|>")
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert [ours.token_to_str(i) for i in ids] == [
        theirs.decode([i], skip_special_tokens=False) for i in ids
    ]
    assert ours.token_to_str(19556) == "Hello"


# --- chat templates -------------------------------------------------------------------


def test_chat_template_equals_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = pair
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == (
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            )
    assert ours.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


TOOL_TEMPLATE = """
{%- set ns = namespace(count=0) -%}
{%- if tools %}Tools: {{ tools | tojson }}
{% endif -%}
{%- for m in messages -%}
  {%- if m.role == 'tool' %}{% continue %}{% endif -%}
  {%- if m.role not in ['user', 'assistant', 'system'] -%}
    {{ raise_exception('Unknown role: ' + m.role) }}
  {%- endif -%}
  {%- set ns.count = ns.count + 1 -%}
  [{{ ns.count }}:{{ m.role }}] {% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}[assistant]{% endif -%}
{{ dict(a=1) | tojson }}{{ extra_var | default('') }}
"""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, e.g. Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_custom_template_with_tools_equals_transformers(dir_pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = dir_pair
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "tool", "content": "skipped"},
        {"role": "assistant", "content": "Sunny <b>22°C</b>", "tool_calls": None},
    ]
    kwargs: dict[str, Any] = {"chat_template": TOOL_TEMPLATE, "tools": TOOLS, "extra_var": "X"}
    rendered = ours.apply_chat_template(messages, **kwargs)
    assert rendered == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert (
        'Tools: [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city, e.g. Zürich"'
        in rendered
    )
    assert "[2:assistant] Sunny <b>22°C</b><|im_end|>" in rendered


def test_continue_final_message_equals_transformers(pair: tuple[Tokenizer, Any]) -> None:
    ours, theirs = pair
    messages = [
        {"role": "user", "content": "Count to three"},
        {"role": "assistant", "content": "One, two,"},
    ]
    text = ours.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert text == theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nOne, two,")


def test_template_raise_exception(dir_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = dir_pair
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template([{"role": "robot", "content": "x"}], chat_template=TOOL_TEMPLATE)
    assert str(info.value) == "the chat template refused the conversation: Unknown role: robot"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = messages.append({'role': 'evil'}) %}{{ messages | length }}",
        "{% set ns = namespace() %}{% set ns._hidden = 1 %}{{ ns._hidden }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(dir_pair: tuple[Tokenizer, Any], template: str) -> None:
    ours, _ = dir_pair
    with pytest.raises(ChatTemplateError, match=r"^the chat template tried an unsafe operation: "):
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)


def test_template_syntax_error(dir_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = dir_pair
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template([], chat_template="{% for m in messages %}")
    assert str(info.value).startswith(
        "the chat template does not compile: Unexpected end of template"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "the chat template took longer than 0.3 s to render",
        ),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "the chat template rendered"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template recursed"),
        ("{{ 1 / 0 }}", "the chat template failed to render: ZeroDivisionError"),
    ],
)
def test_every_render_is_bounded(
    dir_pair: tuple[Tokenizer, Any], monkeypatch: pytest.MonkeyPatch, template: str, message: str
) -> None:
    ours, _ = dir_pair
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    monkeypatch.setattr(chat_template, "RENDER_CHARS", 1_000_000)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)
    assert str(info.value).startswith(message)
    assert time.monotonic() - start < 5
    # The model's own template still renders: the bound is per render.
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_compiled_templates_are_a_bounded_lru(dir_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = dir_pair
    first = "{{ 'first' }}"
    ours.apply_chat_template([], chat_template=first)
    for i in range(COMPILED_TEMPLATES + 8):
        ours.apply_chat_template([], chat_template=f"{{{{ {i} }}}}")
        ours.apply_chat_template([], chat_template=first)  # kept in use: never evicted
    kept = list(ours._compiled)
    assert len(kept) == COMPILED_TEMPLATES
    assert (
        kept[-1] == first
        and "{{ 0 }}" not in kept
        and f"{{{{ {COMPILED_TEMPLATES + 7} }}}}" in kept
    )


def _tokenizer_dir(source: Path, tmp_path: Path, **config_changes: Any) -> Path:
    out = tmp_path / "tok"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_named_templates_and_tool_use_selection(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ (tools or []) | length }}"},
    ]
    directory = _tokenizer_dir(smollm2_hf_dir, tmp_path, chat_template=templates)
    ours = load_tokenizer_from_dir(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [{"role": "user", "content": "x"}]
    assert ours.chat_template_names == ("default", "tool_use")
    tools: Any
    for tools in (None, TOOLS):
        assert ours.apply_chat_template(messages, tools=tools) == theirs.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
    assert ours.apply_chat_template(messages, tools=TOOLS) == "T1"
    assert ours.apply_chat_template(messages, chat_template="tool_use") == "T0"
    # a chat_template.jinja file takes priority over tokenizer_config.json
    (directory / "chat_template.jinja").write_text("F{{ messages[0].content }}")
    assert load_tokenizer_from_dir(directory).apply_chat_template(messages) == "Fx"


def test_no_chat_template(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    directory = _tokenizer_dir(smollm2_hf_dir, tmp_path)
    ours = load_tokenizer_from_dir(directory, source="tiny")
    assert ours.chat_template is None
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    assert str(info.value) == (
        "model 'tiny' has no chat template; pass one with chat_template (e.g. --chat-template) "
        "or send plain completions"
    )


def test_bos_eos_follow_tokenizer_json_like_transformers(
    smollm2_hf_dir: Path, tmp_path: Path
) -> None:
    # with a tokenizer.json, transformers 5 ignores tokenizer_config's add_*_token flags
    directory = _tokenizer_dir(smollm2_hf_dir, tmp_path, add_bos_token=True, add_eos_token=True)
    ours = load_tokenizer_from_dir(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.encode("Hello world") == theirs.encode("Hello world") == [19556, 905]
    # the post-processor in tokenizer.json is what adds BOS/EOS
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
            "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]},
        },
    }
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    ours = load_tokenizer_from_dir(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS[:12]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(
            text, add_special_tokens=False
        )
    assert ours.encode("Hello world") == [1, 19556, 905, 2]


def test_eos_ids_from_configs(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    directory = _tokenizer_dir(smollm2_hf_dir, tmp_path)
    ours = load_tokenizer_from_dir(
        directory, hf_config={"eos_token_id": [2, 5]}, generation_config={"eos_token_id": 0}
    )
    assert ours.eos_token_ids == frozenset({0, 2, 5})
    assert ours.eos_token_id == 2


# --- incremental detokenization -------------------------------------------------------


class _CountingTokenizer(Tokenizer):
    """A real tokenizer that records how many ids each decode call sees."""

    def __init__(self, base: Tokenizer) -> None:
        super().__init__(
            base.backend,
            special_tokens=base.special_tokens,
            eos_token_ids=base.eos_token_ids,
            chat_templates={},
            source=base.source,
        )
        self.decode_lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def _stream(
    tokenizer: Tokenizer, ids: Sequence[int], prompt: Sequence[int], skip: bool, step: int = 1
) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [detok.add_tokens(ids[i : i + step]) for i in range(0, len(ids), step)]
    tail = detok.finish()
    assert detok.output_text == "".join(deltas) + tail
    return deltas, tail


MULTIBYTE = [
    "日本語のテキストです。東京は大きい都市です。",
    "emoji 🎉🚀👩‍👩‍👧‍👦 and more 🇫🇷🇯🇵 done",
    "中文测试，标点符号！한국어 문장입니다 ∑ x² ≤ ∞",
    "Ελληνικά και русский текст, مرحبا",
]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_detokenizer_holds_split_characters(gguf_pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, _ = gguf_pair
    ids = ours.encode(text)
    deltas, tail = _stream(ours, ids, ours.encode("<|im_start|>assistant\n"), skip=True)
    assert "".join(deltas) == text
    assert tail == ""
    assert all("\ufffd" not in d for d in deltas)
    if any("\ufffd" in ours.decode(ids[:i]) for i in range(1, len(ids))):
        assert "" in deltas  # a split character was held back at least once


def test_detokenizer_matches_decode_on_random_ids(gguf_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = gguf_pair
    rng = random.Random(1234)
    # ids of tokens that are bare or partial UTF-8 bytes (CJK/emoji pieces) plus specials
    pieces = [i for i in range(ours.vocab_size) if "\ufffd" in ours.token_to_str(i)]
    assert len(pieces) > 100
    pool = list(range(17)) + pieces[:400] + list(range(100, 2000))
    for trial in range(60):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 80))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        skip = trial % 2 == 0
        deltas, tail = _stream(ours, ids, prompt, skip, step=rng.choice([1, 1, 2, 3]))
        assert "".join(deltas) + tail == ours.decode(ids, skip_special_tokens=skip), (ids, prompt)


def test_detokenizer_decodes_a_bounded_window(gguf_pair: tuple[Tokenizer, Any]) -> None:
    counting = _CountingTokenizer(gguf_pair[0])
    text = (MULTIBYTE[0] + " The quick brown fox. " + MULTIBYTE[1]) * 40
    ids = counting.encode(text)
    assert len(ids) > 1000
    deltas, _ = _stream(counting, ids, [], skip=True)
    assert "".join(deltas) == text
    assert max(counting.decode_lengths) <= 33


def test_detokenizer_without_skipping_specials(gguf_pair: tuple[Tokenizer, Any]) -> None:
    ours, _ = gguf_pair
    ids = ours.encode("Hi there<|im_end|>\n<|im_start|>user")
    deltas, _ = _stream(ours, ids, [], skip=False)
    assert "".join(deltas) == "Hi there<|im_end|>\n<|im_start|>user"
    deltas, _ = _stream(ours, ids, [], skip=True)
    assert "".join(deltas) == "Hi there\nuser"


def test_detokenizer_window_stays_bounded_when_characters_never_complete(
    gguf_pair: tuple[Tokenizer, Any],
) -> None:
    counting = _CountingTokenizer(gguf_pair[0])
    lead = counting.backend.token_to_id("ð")  # the lone byte 0xF0 opens a 4-byte character
    assert lead is not None
    assert counting.decode([lead]) == "\ufffd"
    ids = [lead] * 300 + counting.encode(" then text 🎉")
    deltas, tail = _stream(counting, ids, [], skip=True)
    assert max(counting.decode_lengths) <= 33
    assert "".join(deltas) + tail == counting.decode(ids) == "\ufffd" * 300 + " then text 🎉"
    assert tail == ""


def test_gguf_add_bos_flag(
    random_checkpoint: Callable[..., Path],
    smollm2_gguf_path: Path,
    gguf_pair: tuple[Tokenizer, Any],
) -> None:
    source = random_checkpoint("llama", seed=5)
    directory = cached_build(
        "gguf-add-bos",
        {"source": str(source), "tokenizer": str(smollm2_gguf_path)},
        lambda out: (
            build_gguf_from_hf(
                source,
                out / "bos.gguf",
                tokenizer_gguf=smollm2_gguf_path,
                tokenizer_overrides={"tokenizer.ggml.add_bos_token": True},
            ).parent
        ),
    )
    path = directory / "bos.gguf"
    ours = load_tokenizer(load_checkpoint(str(path), hf_hub_offline=True, use_modelscope=False))
    base, _ = gguf_pair
    # what transformers' update_post_processor does with add_bos_token: BOS before the text
    for text in TEXTS:
        assert ours.encode(text) == [1, *base.encode(text)], text
        assert ours.encode(text, add_special_tokens=False) == base.encode(text), text
    assert ours.encode("Hello world") == [1, 19556, 905]
    assert ours.chat_template == base.chat_template
