"""The offline API on the real SmolLM2 weights: shapes like vLLM's, every sampling feature."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrun import LLM, SamplingParams
from kvrun.errors import ConfigError, KvrunError, ModelLoadError, RequestError
from tests.support.logs import kvrun_log

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_hf_dir: Path) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, VLLM_CPU_KVCACHE_SPACE="0.5")
        yield LLM(model=str(smollm2_hf_dir), max_model_len=1024, dtype="float32")


def test_generate_shapes_and_prompt_forms(llm: LLM) -> None:
    [out] = llm.generate("The capital of France is", GREEDY, use_tqdm=False)
    assert out.prompt == "The capital of France is"
    assert out.finished and len(out.outputs) == 1
    seq = out.outputs[0]
    assert len(seq.token_ids) == 24 and seq.finish_reason == "length"
    assert seq.text == llm.get_tokenizer().decode(seq.token_ids)
    [by_ids] = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)
    assert by_ids.prompt is None
    assert by_ids.outputs[0].token_ids == seq.token_ids
    [by_dict] = llm.generate([{"prompt": "The capital of France is"}], GREEDY, use_tqdm=False)
    assert by_dict.outputs[0].token_ids == seq.token_ids


def test_outputs_keep_prompt_order_with_per_prompt_params(llm: LLM) -> None:
    prompts = ["One", "Two two", "Three three three"]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5, 7]
    with pytest.raises(KvrunError, match="got 2 sampling_params for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    [chat] = llm.chat(messages, GREEDY, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    [plain] = llm.generate({"prompt_token_ids": chat.prompt_token_ids}, GREEDY, use_tqdm=False)
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_n_samples_and_seeds_reproduce_regardless_of_batch(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    [alone] = llm.generate("Tell me a story", params, use_tqdm=False)
    assert [o.index for o in alone.outputs] == [0, 1, 2]
    batch = llm.generate(
        ["Something else entirely", "Tell me a story", "And a third prompt"],
        [SamplingParams(temperature=1.0, max_tokens=9), params, SamplingParams(max_tokens=5)],
        use_tqdm=False,
    )
    assert [o.token_ids for o in batch[1].outputs] == [o.token_ids for o in alone.outputs]
    # Different children draw differently (seed + index), so not all three are equal.
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1


def test_stop_strings_split_across_tokens(llm: LLM) -> None:
    [ref] = llm.generate("Once upon a time", GREEDY, use_tqdm=False)
    text = ref.outputs[0].text
    tokenizer = llm.get_tokenizer()
    pieces = [tokenizer.decode([t]) for t in ref.outputs[0].token_ids]
    # A stop string that starts inside token 3 and ends inside token 5.
    start = len(pieces[0]) + len(pieces[1]) + len(pieces[2]) // 2
    end = sum(len(p) for p in pieces[:5]) - 1
    stop = text[start:end]
    assert len(stop) >= 2 and text.find(stop) == start
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True)
    [out] = llm.generate("Once upon a time", params, use_tqdm=False)
    seq = out.outputs[0]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", stop)
    assert seq.text == text[:start]
    keep = SamplingParams(
        temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True
    )
    [kept] = llm.generate("Once upon a time", keep, use_tqdm=False)
    assert kept.outputs[0].text == text[:end]


def test_stop_token_ids_min_tokens_and_eos(llm: LLM) -> None:
    [ref] = llm.generate("Count: 1, 2, 3,", GREEDY, use_tqdm=False)
    tokens = ref.outputs[0].token_ids
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id])
    [out] = llm.generate("Count: 1, 2, 3,", params, use_tqdm=False)
    seq = out.outputs[0]
    assert seq.token_ids == tokens[: first + 1]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", stop_id)
    # the stop token is not text unless asked for, as in vLLM
    decode = llm.get_tokenizer().decode
    assert seq.text == decode(tokens[:first])
    kept = params.replace(include_stop_str_in_output=True)
    [with_stop] = llm.generate("Count: 1, 2, 3,", kept, use_tqdm=False)
    assert with_stop.outputs[0].text == decode(tokens[: first + 1])
    # A chat answer ends with EOS on its own; min_tokens pushes EOS past 30 tokens.
    messages = [{"role": "user", "content": "Say only the word yes."}]
    [short] = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)
    assert short.outputs[0].finish_reason == "stop"
    eos_at = len(short.outputs[0].token_ids)
    assert short.outputs[0].token_ids[-1] in llm.get_tokenizer().eos_token_ids
    raw = SamplingParams(temperature=0.0, max_tokens=200, skip_special_tokens=False)
    [unskipped] = llm.chat(messages, raw, use_tqdm=False)
    assert unskipped.outputs[0].text == short.outputs[0].text  # EOS's text left out too
    longer = SamplingParams(temperature=0.0, max_tokens=200, min_tokens=eos_at + 10)
    [out2] = llm.chat(messages, longer, use_tqdm=False)
    assert len(out2.outputs[0].token_ids) >= eos_at + 10


def test_logprobs_and_prompt_logprobs(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    [out] = llm.generate("The quick brown fox jumps", params, use_tqdm=False)
    seq = out.outputs[0]
    assert seq.logprobs is not None and len(seq.logprobs) == 6
    for token, entry in zip(seq.token_ids, seq.logprobs):
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert 3 <= len(entry) <= 4
        assert entry[token].decoded_token == llm.get_tokenizer().decode(
            [token], skip_special_tokens=False
        )
    assert seq.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(seq.token_ids, seq.logprobs))
    )
    assert out.prompt_logprobs is not None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert entry is not None and token in entry and len(entry) <= 3
    # Chunked prefill gives the same prompt logprobs as one whole prefill.
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, VLLM_CPU_KVCACHE_SPACE="0.25")
        small = LLM(
            model=llm.llm_engine.config.model_source,
            max_model_len=512,
            max_num_batched_tokens=8,
            max_num_seqs=4,
            dtype="float32",  # as the fixture's engine
        )
    [chunked] = small.generate("The quick brown fox jumps", params, use_tqdm=False)
    for a, b in zip(out.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):  # type: ignore[index]
        assert a is not None and b is not None and a.keys() == b.keys()
        for k in a:
            assert a[k].logprob == pytest.approx(b[k].logprob, abs=1e-4)
    assert chunked.outputs[0].token_ids == seq.token_ids


def test_bad_requests_raise_naming_the_field(llm: LLM) -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RequestError, match="maximum context length is 1024") as info:
        llm.generate("hi", SamplingParams(max_tokens=5000), use_tqdm=False)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate("hi", SamplingParams(logprobs=50), use_tqdm=False)
    # The engine is still healthy after refusing them.
    [ok] = llm.generate("hi", GREEDY, use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == 24
    with pytest.raises(KvrunError, match="unknown option"):
        LLM(model="x", max_model_length=10)


def _env(mp: pytest.MonkeyPatch, **values: str) -> None:
    mp.setenv("VLLM_TARGET_DEVICE", "cpu")
    # LLM() configures the 'kvrun' logger; leave the test process's logging to pytest.
    mp.setenv("VLLM_CONFIGURE_LOGGING", "0")
    for k, v in values.items():
        mp.setenv(k, v)


def test_configuration_errors_are_actionable(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, VLLM_CPU_KVCACHE_SPACE="0.01")
        with pytest.raises(ConfigError, match="max_model_len=8192 needs 512;"):
            LLM(model=str(smollm2_hf_dir))
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings=8192"):
        LLM(model=str(smollm2_hf_dir), max_model_len=10000)
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, VLLM_ATTENTION_BACKEND="NOPE")
        with pytest.raises(ConfigError, match=r"valid backends are: .*TORCH_SDPA"):
            LLM(model=str(smollm2_hf_dir), max_model_len=256)
    broken = tmp_path / "gpt2ish"
    shutil.copytree(smollm2_hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"'GPT2LMHeadModel' is not supported; supported: .*LlamaForCausalLM"
    ):
        LLM(model=str(broken))


def test_long_max_model_len_needs_the_opt_in(
    smollm2_hf_dir: Path,
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1", VLLM_CPU_KVCACHE_SPACE="1")
        with kvrun_log(logging.WARNING) as messages:
            llm = LLM(model=str(smollm2_hf_dir), max_model_len=9000)
    assert llm.llm_engine.config.max_model_len == 9000
    # the rotary table reaches every position a request may now have
    assert llm.llm_engine.runner.model.cos_sin.shape[0] >= 9000  # type: ignore[attr-defined]
    assert any("VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in m for m in messages)


def test_profiler_and_batch_size_log(smollm2_hf_dir: Path, tmp_path: Path) -> None:
    trace_dir = tmp_path / "traces"
    with pytest.MonkeyPatch.context() as mp:
        _env(
            mp,
            VLLM_TORCH_PROFILER_DIR=str(trace_dir),
            VLLM_LOG_BATCHSIZE_INTERVAL="0",
            VLLM_CPU_KVCACHE_SPACE="0.25",
        )
        llm = LLM(model=str(smollm2_hf_dir), max_model_len=256)
    llm.start_profile()
    with kvrun_log(logging.INFO) as messages:
        llm.generate("Profile me", SamplingParams(max_tokens=3), use_tqdm=False)
    llm.stop_profile()
    assert list(trace_dir.glob("*.json.gz")), "no trace written"
    assert any(m.startswith("batch: 1 sequences") for m in messages)
