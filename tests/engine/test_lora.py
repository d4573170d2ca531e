"""LoRA adapters: kvrun's greedy output with PEFT adapters equals peft's on transformers,
request by request in mixed batches (several adapters and none, more adapters than
device slots), with prefix-cache isolation between adapters and clear refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from kvrun.errors import ConfigError, RequestError
from kvrun.lora.request import LoRARequest
from kvrun.ops import reference
from kvrun.sampling_params import SamplingParams
from kvrun.scheduling.block_manager import BlockManager
from kvrun.scheduling.request import Request
from kvrun.scheduling.scheduler import Scheduler, SchedulerConfig
from tests.support.engine import make_engine
from tests.support.lora import make_adapter, peft_greedy

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7],
    [10, 20, 30, 40],
    [5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5],
]
STEPS = 6
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen2(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("qwen2", seed=5, num_layers=2)


@pytest.fixture(scope="module")
def adapters(qwen2: Path) -> dict[str, Path]:
    """Three adapters that differ in rank, modules, alpha and rsLoRA."""
    return {
        "all": make_adapter(qwen2, seed=1, r=8, alpha=16, targets=ALL),
        "qv-rslora": make_adapter(
            qwen2, seed=2, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True
        ),
        "mlp-o": make_adapter(
            qwen2, seed=3, r=2, alpha=4, targets=("o_proj", "gate_proj", "down_proj")
        ),
    }


def _run(
    engine: object,
    prompts: Sequence[list[int]],
    loras: Sequence[LoRARequest | None],
) -> tuple[list[list[int]], list[int]]:
    """Add every (prompt, adapter) pair at once, step to the end: tokens and cached counts."""
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.engine.output_accumulator import OutputAccumulator

    assert isinstance(engine, LLMEngine)
    accumulator = OutputAccumulator()
    ids = [engine.new_request_id() for _ in prompts]
    for rid, prompt, lora in zip(ids, prompts, loras, strict=True):
        engine.add_request(rid, prompt, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                done[out.request_id] = out
    return (
        [list(done[r].outputs[0].token_ids) for r in ids],
        [done[r].num_cached_tokens or 0 for r in ids],
    )


def test_add_lora_op_is_each_tokens_adapter() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 7, generator=g)
    a, b = torch.randn(2, 3, 6, generator=g), torch.randn(2, 7, 3, generator=g)
    scales = torch.tensor([0.5, 2.0])
    slots = torch.tensor([1, -1, 0, 1, -1])
    out = reference.add_lora(y, x, a, b, scales, slots)
    for t, s in enumerate(slots.tolist()):
        want = y[t] if s < 0 else y[t] + scales[s] * (b[s] @ (a[s] @ x[t]))
        torch.testing.assert_close(out[t], want)
    assert torch.equal(out[1], y[1]) and torch.equal(out[4], y[4])  # no adapter: exact


def test_mixed_batch_with_more_adapters_than_slots_equals_peft(
    qwen2: Path, adapters: dict[str, Path]
) -> None:
    """Three adapters and none in one run, two device slots and two host copies: every
    request's tokens equal peft's with its adapter; adapters are swapped in and out."""
    engine = make_engine(
        qwen2,
        enable_lora=True,
        max_loras=2,
        max_cpu_loras=2,
        max_lora_rank=8,
        max_model_len=128,
        num_kv_blocks=96,
        block_size=4,
    )
    names = [None, *adapters]
    requests = {
        name: None if name is None else LoRARequest(name, i, str(adapters[name]))
        for i, name in enumerate(names)
    }
    prompts, loras = [], []
    for prompt in PROMPTS:  # interleaved: each step mixes adapters
        for name in names:
            prompts.append(prompt)
            loras.append(requests[name])
    got, _ = _run(engine, prompts, loras)
    base = peft_greedy(qwen2, None, PROMPTS, STEPS)
    for name in names:
        want = base if name is None else peft_greedy(qwen2, adapters[name], PROMPTS, STEPS)
        for p in range(len(PROMPTS)):
            assert got[p * len(names) + names.index(name)] == want[p], (name, p)
        if name is not None:
            assert want != base, f"adapter {name} changes nothing: the test proves nothing"
    manager = engine.lora
    assert manager is not None
    assert manager.num_slot_loads > len(adapters)  # an adapter came back into a slot
    assert manager.num_reads > len(adapters)  # and was read again after host eviction
    _assert_fused_adapter_steps(engine)


def _assert_fused_adapter_steps(engine: object) -> None:
    """The decode steps with adapters ran in the cpu plugin's fused decode step."""
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun_cpu.native.decoder import NativeDecoder

    assert isinstance(engine, LLMEngine)
    decoder = getattr(engine.runner, "fused_decoder", None)
    assert isinstance(decoder, NativeDecoder) and decoder.lora_attached
    assert decoder.lora_steps >= STEPS - 1  # every decode step of the run had adapters


def test_prefix_cache_never_crosses_adapters(qwen2: Path, adapters: dict[str, Path]) -> None:
    """The same prompt, one request after another: an adapter never reuses the blocks of
    another adapter or of the base model, and does reuse its own."""
    engine = make_engine(
        qwen2,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=128,
        num_kv_blocks=96,
        block_size=4,
    )
    prompt = PROMPTS[2]
    a = LoRARequest("all", 1, str(adapters["all"]))
    b = LoRARequest("qv-rslora", 2, str(adapters["qv-rslora"]))
    want = {
        None: peft_greedy(qwen2, None, [prompt], STEPS)[0],
        "all": peft_greedy(qwen2, adapters["all"], [prompt], STEPS)[0],
        "qv-rslora": peft_greedy(qwen2, adapters["qv-rslora"], [prompt], STEPS)[0],
    }
    cached = {}
    for step, lora in enumerate([None, a, b, a, None, b]):
        tokens, hits = _run(engine, [prompt], [lora])
        name = lora.lora_name if lora else None
        assert tokens[0] == want[name], (step, name)
        cached[step] = hits[0]
    assert cached[0] == cached[1] == cached[2] == 0  # each the first of its adapter
    assert cached[3] > 0 and cached[4] > 0 and cached[5] > 0  # its own blocks again


def test_block_manager_salts_separate_chains() -> None:
    bm = BlockManager(num_blocks=16, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate("plain", 5)
    bm.commit("plain", tokens, 4)
    bm.allocate("salted", 5)
    bm.commit("salted", tokens, 4, b"lora:1:x")
    assert bm.find_prefix(tokens).block_ids == tuple(bm.block_table("plain")[:2])
    assert bm.find_prefix(tokens, b"lora:1:x").block_ids == tuple(bm.block_table("salted")[:2])
    assert bm.find_prefix(tokens, b"lora:2:y").num_tokens == 0


def test_scheduler_runs_at_most_max_loras_adapters_at_once() -> None:
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=64,
            max_model_len=32,
            block_size=4,
            num_blocks=32,
            max_loras=1,
        )
    )
    for rid, lora in (("a", 1), ("base", 0), ("b", 2), ("a2", 1)):
        scheduler.add_request(Request(rid, [1, 2, 3], max_tokens=2, lora_id=lora))
    out = scheduler.schedule()
    # b waits at the head of the queue (one adapter slot); nothing passes it
    assert [c.request_id for c in out.chunks] == ["a", "base"]
    assert [c.lora_id for c in out.chunks] == [1, 0]
    scheduler.update(out, {c.request_id: [7] for c in out.chunks})
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks] == ["a", "base"]
    scheduler.update(out, {c.request_id: [7] for c in out.chunks})  # both finish (2 tokens)
    out = scheduler.schedule()
    assert [c.request_id for c in out.chunks] == ["b"]  # a2 needs adapter 1: waits for b


def test_offline_api_takes_one_adapter_or_one_per_prompt(
    qwen2: Path, adapters: dict[str, Path]
) -> None:
    from kvrun import LLM
    from kvrun import LoRARequest as Exported

    assert Exported is LoRARequest
    llm = LLM(
        str(qwen2),
        dtype="float32",
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=128,
        num_kv_blocks=64,
    )
    a = LoRARequest("all", 1, str(adapters["all"]))
    b = LoRARequest("qv-rslora", 2, str(adapters["qv-rslora"]))
    one = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:2]], GREEDY, use_tqdm=False, lora_request=a
    )
    assert [list(o.outputs[0].token_ids) for o in one] == peft_greedy(
        qwen2, adapters["all"], PROMPTS[:2], STEPS
    )
    each = llm.generate(
        [{"prompt_token_ids": PROMPTS[0]}] * 3, GREEDY, use_tqdm=False, lora_request=[b, None, a]
    )
    assert [list(o.outputs[0].token_ids) for o in each] == [
        peft_greedy(qwen2, adapters["qv-rslora"], PROMPTS[:1], STEPS)[0],
        peft_greedy(qwen2, None, PROMPTS[:1], STEPS)[0],
        peft_greedy(qwen2, adapters["all"], PROMPTS[:1], STEPS)[0],
    ]
    with pytest.raises(ValueError, match="lora_request entries for 3 prompts"):
        llm.generate([[1, 2]] * 3, GREEDY, use_tqdm=False, lora_request=[a])


def _broken(src: Path, dst: Path, edit: Callable[[Path], None]) -> str:
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def _set_config(key: str, value: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config[key] = value
        (path / "adapter_config.json").write_text(json.dumps(config))

    return edit


def test_broken_adapters_are_refused_naming_the_problem(
    qwen2: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    engine = make_engine(
        qwen2, enable_lora=True, max_lora_rank=4, max_model_len=64, num_kv_blocks=32
    )
    good = adapters["qv-rslora"]  # r=4

    def missing(name: str) -> Callable[[Path], None]:
        return lambda p: (p / name).unlink()

    def garbage(p: Path) -> None:
        (p / "adapter_model.safetensors").write_bytes(b"\xff" * 64)

    cases = {
        "rank r=8 is above max_lora_rank=4": str(adapters["all"]),
        "adapter_config.json is missing": _broken(
            good, tmp_path / "noconf", missing("adapter_config.json")
        ),
        "adapter_model.safetensors is missing": _broken(
            good, tmp_path / "noweights", missing("adapter_model.safetensors")
        ),
        "not a valid safetensors file": _broken(good, tmp_path / "garbage", garbage),
        "target module 'lm_head' is not a projection": _broken(
            good, tmp_path / "lmhead", _set_config("target_modules", ["q_proj", "lm_head"])
        ),
        "DoRA adapters are not supported": _broken(
            good, tmp_path / "dora", _set_config("use_dora", True)
        ),
        "lora_path is not a directory": str(tmp_path / "nowhere"),
    }
    for i, (message, path) in enumerate(cases.items()):
        lora = LoRARequest(f"bad{i}", 10 + i, path)
        with pytest.raises(RequestError, match=message) as info:
            engine.add_request(f"r{i}", [1, 2, 3], GREEDY, lora_request=lora)
        assert info.value.param == "lora_request"
        assert str(tmp_path) not in str(info.value)  # names the file, never the directory
    # the engine is unharmed: a good adapter still runs
    tokens, _ = _run(engine, [PROMPTS[0]], [LoRARequest("good", 99, str(good))])
    assert tokens[0] == peft_greedy(qwen2, good, PROMPTS[:1], STEPS)[0]
    with pytest.raises(RequestError, match="already names adapter 'good'"):
        engine.add_lora(LoRARequest("other", 99, str(adapters["mlp-o"])))


def test_lora_needs_enable_lora_and_valid_settings(qwen2: Path, adapters: dict[str, Path]) -> None:
    engine = make_engine(qwen2, max_model_len=64, num_kv_blocks=32)
    with pytest.raises(RequestError, match="enable_lora=True"):
        engine.add_request(
            "r", [1, 2], GREEDY, lora_request=LoRARequest("x", 1, str(adapters["all"]))
        )
    with pytest.raises(ConfigError, match="max_cpu_loras=1 is below max_loras=2"):
        make_engine(qwen2, enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(RequestError, match="lora_int_id=0 is invalid"):
        LoRARequest("x", 0, "/a")


@pytest.fixture(scope="module")
def phi3(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("phi3", seed=5, num_layers=2)


def test_phi3_merged_modules_equal_peft(phi3: Path) -> None:
    """Phi-3 stores q|k|v and gate|up merged: its adapters name qkv_proj and gate_up_proj."""
    adapter = make_adapter(phi3, seed=4, r=4, targets=("qkv_proj", "gate_up_proj", "down_proj"))
    engine = make_engine(
        phi3, enable_lora=True, max_lora_rank=4, max_model_len=128, num_kv_blocks=64
    )
    lora = LoRARequest("phi", 1, str(adapter))
    got, _ = _run(engine, PROMPTS[:2] * 2, [lora, lora, None, None])
    want = peft_greedy(phi3, adapter, PROMPTS[:2], STEPS)
    assert got[:2] == want and got[2:] == peft_greedy(phi3, None, PROMPTS[:2], STEPS)
    assert want != got[2:]


def test_smollm2_adapter_in_a_mixed_batch_equals_peft(smollm2_hf_dir: Path) -> None:
    adapter = make_adapter(smollm2_hf_dir, seed=6, r=8, targets=ALL, std=0.05)
    engine = make_engine(
        smollm2_hf_dir, enable_lora=True, max_lora_rank=8, max_model_len=128, num_kv_blocks=64
    )
    lora = LoRARequest("smol", 1, str(adapter))
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 3, 7, 11]]
    got, _ = _run(engine, prompts * 2, [lora, None, None, lora])
    want = peft_greedy(smollm2_hf_dir, adapter, prompts, STEPS)
    base = peft_greedy(smollm2_hf_dir, None, prompts, STEPS)
    assert [got[0], got[3]] == [want[0], want[1]]
    assert [got[2], got[1]] == base
    assert want != base
    _assert_fused_adapter_steps(engine)
