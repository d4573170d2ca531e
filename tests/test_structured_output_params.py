"""Structured output's parts that need no model: the params, the regex guard, grammar
checks with xgrammar, the bitmask op and the sampler's use of it."""

from __future__ import annotations

import contextlib
import json
import time

import pydantic
import pytest
import torch

from kvrun.errors import ConfigError, RequestError
from kvrun.ops import reference
from kvrun.sampling import Sampler, SamplingRow, build_sampling_metadata
from kvrun.sampling_params import SamplingParams
from kvrun.structured_output import StructuredOutputsParams
from kvrun.structured_output.compiler import (
    allocate_token_bitmask,
    check_constraint,
    check_regex,
    resolve_backend,
)


def test_exactly_one_constraint() -> None:
    with pytest.raises(RequestError, match=r"exactly one of .* got none"):
        StructuredOutputsParams()
    with pytest.raises(RequestError, match="got json, regex"):
        StructuredOutputsParams(json={"type": "object"}, regex="a+")
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


def test_json_is_kept_as_canonical_text() -> None:
    a = StructuredOutputsParams(json={"b": 1, "a": {"type": "string"}})
    b = StructuredOutputsParams(json='{"a": {"type": "string"}, "b": 1}')
    assert a.source == b.source and a.cache_key == b.cache_key

    class Point(pydantic.BaseModel):
        x: int
        y: int

    from_model = StructuredOutputsParams(json=Point)
    assert json.loads(from_model.source)["required"] == ["x", "y"]


def _deep_text(depth: int) -> str:
    return '{"type": "object", "properties": {"a": ' * depth + "{}" + "}}" * depth


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"json": "{not json"}, "structured_outputs.json", "JSON schema"),
        ({"json": [1, 2]}, "structured_outputs.json", "JSON schema"),
        ({"json": _deep_text(100)}, "structured_outputs.json", "nested at most"),
        ({"json": _deep_text(5000)}, "structured_outputs.json", "JSON schema"),  # no RecursionError
        ({"regex": ""}, "structured_outputs.regex", "non-empty"),
        ({"regex": "a" * 300_000}, "structured_outputs.regex", "at most"),
        ({"choice": "yes"}, "structured_outputs.choice", "list"),
        ({"choice": ["a", 3]}, "structured_outputs.choice", "list"),
        ({"grammar": 7}, "structured_outputs.grammar", "EBNF"),
        (
            {"json_object": True, "disable_any_whitespace": "yes"},
            "structured_outputs.disable_any_whitespace",
            "true or false",
        ),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        StructuredOutputsParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.param == field
    assert words in str(caught.value)


def test_sampling_params_take_only_structured_outputs_params() -> None:
    with pytest.raises(RequestError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pattern",
    [
        r"(\d+,)*\d+",
        r"[a-z]+@[a-z]+\.com",
        r"(ab)+",
        r"\d{3}-\d{4}",
        r"(a|b)*c",
        r"(?:x[0-9]+)*",
        r"\(a+\)+",
        r"(x(a+))*",
        r"(\w+\s)*\w+",
        r"[(]a+[)]+",
        r"a{2,}b{1,3}",
    ],
)
def test_regexes_without_nested_repetition_pass(pattern: str) -> None:
    check_regex(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a+)+$",
        r"(a|b+)*",
        r"(\s*\w+)*",
        r"((a+))+",
        r"(a*)*",
        r"(x+){2,}",
        r"(?:[ab]+)+",
        r"^(\d+)*$",
    ],
)
def test_nested_unbounded_repetition_is_refused(pattern: str) -> None:
    with pytest.raises(RequestError, match="nested unbounded repetition"):
        check_regex(pattern)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"regex": "foo**"}, "repetition"),
        ({"regex": "(unclosed"}, "regular expression"),
        ({"json": {"type": "foo"}}, 'Unsupported type "foo"'),
        ({"grammar": "root ::= "}, "EBNF"),
        ({"grammar": 'start ::= "a"'}, "root"),
        ({"structural_tag": {"structures": [{"begin": "<a>"}], "triggers": ["<a"]}}, "structures"),
        ({"json_object": True, "whitespace_pattern": "[ ]"}, "whitespace"),
    ],
)
def test_constraints_that_do_not_compile_are_request_errors(
    kwargs: dict[str, object], words: str
) -> None:
    params = StructuredOutputsParams(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(RequestError) as caught:
        check_constraint(params)
    assert caught.value.param is not None and caught.value.param.startswith("structured_outputs.")
    assert words in str(caught.value)


def test_every_kind_compiles() -> None:
    tag = {
        "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}],
        "triggers": ["<f>"],
    }
    for kwargs in (
        {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        {"json_object": True},
        {"regex": r"\d+"},
        {"choice": ['say "hi"', "a\\b", "new\nline"]},
        {"grammar": 'root ::= "a" | "b"'},
        {"structural_tag": tag},
    ):
        check_constraint(StructuredOutputsParams(**kwargs))  # type: ignore[arg-type]


def test_pathological_inputs_are_answered_quickly() -> None:
    """Checks are bounded: the guard and xgrammar's parser are not backtracking engines."""
    started = time.monotonic()
    for pattern in (
        "(" * 2000 + "a" + ")" * 2000 + "+",
        "[" * 50_000,
        "a?" * 30_000 + "a" * 30_000,
    ):
        with contextlib.suppress(RequestError):
            check_constraint(StructuredOutputsParams(regex=pattern))
    assert time.monotonic() - started < 10.0


def test_backends() -> None:
    assert resolve_backend(None) == resolve_backend("auto") == "xgrammar"
    assert resolve_backend("guidance") == "guidance"  # llguidance is a test dependency
    with pytest.raises(ConfigError, match=r"outlines.*accepted: auto, xgrammar"):
        resolve_backend("outlines")


def _bitmask_allowing(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    bitmask = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[row, t // 32] |= 1 << (t % 32)
    return bitmask.to(torch.int32)  # two's complement: bit 31 is the sign


def test_reference_bitmask_masks_exactly_the_disallowed_tokens() -> None:
    vocab = 70
    logits = torch.randn(3, vocab)
    before = logits.clone()
    allowed = [{0, 31, 32, 69}, {5}]
    reference.apply_token_bitmask(logits, _bitmask_allowing(allowed, vocab), torch.tensor([2, 0]))
    assert torch.equal(logits[1], before[1])  # a row without a mask is untouched
    for row, tokens in ((2, allowed[0]), (0, allowed[1])):
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == tokens
        assert torch.equal(logits[row, sorted(tokens)], before[row, sorted(tokens)])
    assert allocate_token_bitmask(2, vocab).shape == (2, 3)


class _Allow:
    """A TokenMask allowing a fixed set of tokens (what a grammar matcher provides)."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens = tokens

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = _bitmask_allowing([self.tokens], bitmask.shape[1] * 32)[0]


def test_sampler_applies_each_rows_mask_and_leaves_other_rows() -> None:
    vocab = 100
    logits = torch.randn(3, vocab)
    expected_free = int(logits[1].argmax())
    greedy = SamplingParams(temperature=0.0)
    rows = [
        SamplingRow(greedy, [1], [], token_mask=_Allow({7, 9})),
        SamplingRow(greedy, [1], []),
        SamplingRow(SamplingParams(temperature=1.0, seed=0), [1], [], token_mask=_Allow({42})),
    ]
    md = build_sampling_metadata(rows, vocab, torch.device("cpu"))
    want_first = 7 if logits[0, 7] > logits[0, 9] else 9
    out = Sampler()(logits, md)
    assert out.token_ids == [want_first, expected_free, 42]


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"regex": "foo**"}, "regex", "multiple repeat"),
        ({"regex": "(a+)+$"}, "regex", "nested unbounded repetition"),
        ({"json": {"type": "foo"}}, "json", "Invalid type"),
        ({"structural_tag": {"structures": [], "triggers": []}}, "structural_tag", "xgrammar"),
    ],
)
def test_the_guidance_backend_refuses_alike(
    kwargs: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(RequestError) as caught:
        check_constraint(StructuredOutputsParams(**kwargs), "guidance")  # type: ignore[arg-type]
    assert caught.value.param == f"structured_outputs.{field}"
    assert words in str(caught.value)
