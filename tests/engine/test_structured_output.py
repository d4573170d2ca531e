"""Structured output in the engine on the real SmolLM2 weights: every constrained output
conforms, whatever shares its batch, and nothing else changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from kvrun.engine.llm_engine import LLMEngine
from kvrun.errors import RequestError
from kvrun.sampling_params import SamplingParams
from kvrun.structured_output import StructuredOutputsParams as Constraint
from tests.support.engine import make_engine, run_all

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"}},
        "required": ["ok", "score"],
    },
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
    {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
]


@pytest.fixture(scope="module")
def engine(smollm2_hf_dir: Path) -> LLMEngine:
    return make_engine(smollm2_hf_dir, max_model_len=512, num_kv_blocks=160)


def _prompt(engine: LLMEngine, text: str) -> list[int]:
    tokenizer = engine.tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def test_json_schemas_hold_for_sampled_and_greedy_outputs(engine: LLMEngine) -> None:
    prompt = _prompt(engine, "Answer in JSON.")
    params = [
        SamplingParams(
            max_tokens=160,
            temperature=temperature,
            seed=seed,
            n=2 if temperature else 1,
            structured_outputs=Constraint(json=schema),
        )
        for schema in SCHEMAS
        for temperature, seed in ((0.0, None), (1.0, 7))
    ]
    outputs = run_all(engine, [prompt] * len(params), params)
    for out, p in zip(outputs, params, strict=True):
        assert p.structured_outputs is not None
        schema = json.loads(p.structured_outputs.source)
        for seq in out.outputs:
            assert seq.finish_reason == "stop", seq.text
            jsonschema.validate(json.loads(seq.text), schema)


def test_free_rows_are_unchanged_beside_constrained_ones(engine: LLMEngine) -> None:
    tokenizer = engine.tokenizer
    free = [tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):", "Hi")]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = run_all(engine, free, greedy)
    constrained = SamplingParams(
        max_tokens=60,
        temperature=0.0,
        structured_outputs=Constraint(regex=r"[a-z]{3,9}( [a-z]{3,9}){2,5}\."),
    )
    mixed = run_all(
        engine,
        [free[0], _prompt(engine, "Say something."), free[1], free[2]],
        [greedy, constrained, greedy, greedy],
    )
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2], mixed[3])] == [
        o.outputs[0].token_ids for o in alone
    ]
    assert re.fullmatch(r"[a-z]{3,9}( [a-z]{3,9}){2,5}\.", mixed[1].outputs[0].text)


def test_choice_regex_and_grammar_through_preemption(
    smollm2_hf_dir: Path, engine: LLMEngine
) -> None:
    """A KV cache too small for the batch preempts and recomputes sequences: each one's
    grammar state carries over, and the outputs equal those of a roomy cache (the
    module's engine: 160 blocks hold the whole batch)."""
    constraints = [
        Constraint(choice=["red", "green", "blue", "a very long colour name indeed"]),
        Constraint(regex=r"\(\d{3}\) \d{3}-\d{4}"),
        Constraint(grammar='root ::= item (", " item)? (", " item)?\nitem ::= "x" | "y" | "zz"'),
    ]
    params = [
        SamplingParams(max_tokens=48, temperature=0.8, seed=i, structured_outputs=c)
        for i, c in enumerate(constraints * 3)
    ]
    roomy = engine
    assert roomy.reset_prefix_cache()  # every prompt computed, as in the tight engine
    preemptions = roomy.scheduler.stats.num_preemptions_total
    tight = make_engine(smollm2_hf_dir, max_model_len=256, num_kv_blocks=17)
    prompts = [_prompt(roomy, f"Question {i}: give an answer.") for i in range(len(params))]
    want = run_all(roomy, prompts, params)
    assert roomy.scheduler.stats.num_preemptions_total == preemptions  # roomy indeed
    got = run_all(tight, prompts, params)
    assert tight.scheduler.stats.num_preemptions_total > 0
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    for out, p in zip(got, params, strict=True):
        text = out.outputs[0].text
        c = p.structured_outputs
        assert c is not None
        if c.kind == "choice":
            assert text in (c.choice or [])
        elif c.kind == "regex":
            assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text), text
        else:
            assert re.fullmatch(r"(x|y|zz)(, (x|y|zz)){0,2}", text), text


def test_a_finished_grammar_stops_even_under_ignore_eos(engine: LLMEngine) -> None:
    params = SamplingParams(
        max_tokens=30,
        temperature=0.0,
        ignore_eos=True,
        structured_outputs=Constraint(choice=["yes", "no"]),
    )
    [out] = run_all(engine, [_prompt(engine, "Is the sky blue?")], params)
    seq = out.outputs[0]
    assert seq.text in {"yes", "no"} and seq.finish_reason == "stop"
    assert len(seq.token_ids) < 30


def test_one_compile_per_constraint(engine: LLMEngine) -> None:
    first = Constraint(json={"type": "object", "properties": {"k": {"type": "integer"}}})
    same = Constraint(json='{"properties": {"k": {"type": "integer"}}, "type": "object"}')
    compiler = engine.grammars.compiler
    assert compiler.submit(first).result() is compiler.submit(same).result()


def test_bad_constraints_are_refused_at_add_request(engine: LLMEngine) -> None:
    prompt = _prompt(engine, "Hi")
    for constraint in (Constraint(regex="(a+)+$"), Constraint(json={"type": "foo"})):
        with pytest.raises(RequestError) as caught:
            engine.add_request("bad", prompt, SamplingParams(structured_outputs=constraint))
        assert caught.value.param is not None
        assert caught.value.param.startswith("structured_outputs.")
    assert not engine.has_unfinished_requests()


def test_the_guidance_backend(smollm2_hf_dir: Path) -> None:
    """llguidance as the backend (structured_outputs_config): the same constraints hold."""
    engine = make_engine(
        smollm2_hf_dir,
        max_model_len=512,
        num_kv_blocks=96,
        structured_outputs_config={"backend": "guidance"},
    )
    prompt = _prompt(engine, "Answer in JSON.")
    schema = SCHEMAS[0]
    cases = [
        (Constraint(json=schema), lambda t: jsonschema.validate(json.loads(t), schema) or True),
        (Constraint(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (Constraint(regex=r"[a-z]{2,6}-\d{2}"), lambda t: re.fullmatch(r"[a-z]{2,6}-\d{2}", t)),
        (Constraint(choice=["up", "down"]), lambda t: t in ("up", "down")),
        (
            Constraint(grammar='root ::= "x" [0-9] [0-9]? "y"'),
            lambda t: re.fullmatch(r"x\d\d?y", t),
        ),
    ]
    params = [
        SamplingParams(max_tokens=160, temperature=0.8, seed=i, structured_outputs=c)
        for i, (c, _) in enumerate(cases)
    ]
    outputs = run_all(engine, [prompt] * len(cases), params)
    for out, (_, check) in zip(outputs, cases, strict=True):
        seq = out.outputs[0]
        assert seq.finish_reason == "stop", seq.text
        assert check(seq.text), seq.text
    tag = {"structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}], "triggers": ["<a>"]}
    with pytest.raises(RequestError, match="structural tags need the xgrammar backend"):
        engine.add_request(
            "tag", prompt, SamplingParams(structured_outputs=Constraint(structural_tag=tag))
        )
