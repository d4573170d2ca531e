"""LoRA adapters on the families beyond the Llama-dense ones: Gemma 2/3, the media
LMs (Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) and the mixtures (Mixtral, Qwen2-MoE, Qwen3-MoE).

Each adapter is made with peft on a random tiny checkpoint; kvrun's greedy tokens in a
mixed batch (two adapters and none) equal transformers' with the adapter applied by
peft, request by request, in float32. Refusals name the module at fault."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.errors import RequestError
from kvrun.lora.request import LoRARequest
from kvrun.sampling_params import SamplingParams
from tests.engine.test_parity_families import MODELS as PARITY_MODELS
from tests.support.engine import make_engine
from tests.support.lora import make_adapter, peft_greedy

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5]]
STEPS = 5
GREEDY = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)


def _run(engine: Any, prompts: Sequence[Any], loras: Sequence[LoRARequest | None]) -> list[Any]:
    """Every (prompt, adapter) pair added at once, stepped to the end: each one's tokens."""
    from kvrun.engine.output_accumulator import OutputAccumulator

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
    return [list(done[r].outputs[0].token_ids) for r in ids]


@pytest.fixture(scope="module")
def lora_engine() -> Iterator[Callable[[Path], Any]]:
    """``lora_engine(base)``: the module's one LoRA engine on ``base`` (two adapter slots,
    ranks up to 8), shared by its tests. An engine refuses a lora_int_id that already
    names another adapter, so each test gives its adapters ids of its own (FIRST_IDS)."""
    engines: dict[Path, Any] = {}

    def get(base: Path) -> Any:
        if base not in engines:
            engines[base] = make_engine(
                base,
                enable_lora=True,
                max_loras=2,
                max_lora_rank=8,
                max_model_len=64,
                num_kv_blocks=64,
                block_size=4,
            )
        return engines[base]

    yield get
    engines.clear()


# the first lora_int_id of each test's adapters on the shared engines (see lora_engine)
FIRST_IDS = {
    "mixed": 1,
    "patterns": 21,
    "gemma-refusals": 31,
    "v4": 11,
    "fused-experts": 41,
    "mixture-refusals": 51,
}


def _check_mixed_batch(engine: Any, base: Path, adapters: dict[str, Path], first_id: int) -> None:
    """Two adapters and none, interleaved in one batch: each equals peft's."""
    names: list[str | None] = [*adapters, None]
    requests = {
        n: None if n is None else LoRARequest(n, first_id + i, str(adapters[n]))
        for i, n in enumerate(names)
    }
    got = _run(
        engine, [p for p in PROMPTS for _ in names], [requests[n] for _ in PROMPTS for n in names]
    )
    plain = peft_greedy(base, None, PROMPTS, STEPS)
    for j, n in enumerate(names):
        want = plain if n is None else peft_greedy(base, adapters[n], PROMPTS, STEPS)
        assert [got[p * len(names) + j] for p in range(len(PROMPTS))] == want, n
        if n is not None:
            assert want != plain, f"adapter {n} changes nothing: the test proves nothing"


GEMMA = {
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 8,
        "tie_word_embeddings": True,
        "extra_config": {"query_pre_attn_scalar": 16},
    },
    "gemma3": {
        "head_dim": 16,
        "sliding_window": 24,
        "tie_word_embeddings": True,
        "extra_config": {
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 100.0, "rope_type": "default"},
            },
        },
    },
}


@pytest.mark.parametrize("arch", list(GEMMA))
def test_gemma_adapters_in_a_mixed_batch_equal_peft(
    arch: str, random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any]
) -> None:
    base = random_checkpoint(arch, seed=11, init_std=0.3, num_layers=3, **GEMMA[arch])
    _check_mixed_batch(
        lora_engine(base),
        base,
        {
            "all": make_adapter(base, seed=1, r=8, alpha=16, targets=ALL),
            "qv-down": make_adapter(
                base,
                seed=2,
                r=4,
                alpha=8,
                targets=("q_proj", "v_proj", "down_proj"),
                use_rslora=True,
            ),
        },
        FIRST_IDS["mixed"],
    )


def test_per_module_ranks_and_alphas_equal_peft(
    random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any]
) -> None:
    """PEFT's rank_pattern and alpha_pattern: modules with their own r and alpha (their
    scale folded into B), one of them at a rank above the adapter's r."""
    base = random_checkpoint("gemma3", seed=11, init_std=0.3, num_layers=3, **GEMMA["gemma3"])
    adapter = make_adapter(
        base,
        seed=7,
        r=4,
        alpha=8,
        targets=ALL,
        rank_pattern={"q_proj": 8, "down_proj": 2},
        alpha_pattern={"o_proj": 32, r"layers\.1\.mlp\.up_proj": 1},
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    engine = lora_engine(base)
    lora = LoRARequest("patterns", FIRST_IDS["patterns"], str(adapter))
    got = _run(engine, PROMPTS * 2, [lora, None, None, lora])
    want = peft_greedy(base, adapter, PROMPTS, STEPS)
    assert [got[0], got[3]] == want and [got[2], got[1]] == peft_greedy(base, None, PROMPTS, STEPS)
    assert want != [got[2], got[1]]


def test_gemma_refusals_name_the_module(
    random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any], tmp_path: Path
) -> None:
    """A module the model lacks (DeepSeek's kv_a_proj_with_mqa), a module without its
    lora_B, and a fused parameter on a model without experts: each a clear refusal."""
    from safetensors.torch import load_file, save_file

    base = random_checkpoint("gemma2", seed=11, init_std=0.3, num_layers=3, **GEMMA["gemma2"])
    good = make_adapter(base, seed=2, r=4, alpha=8, targets=("k_proj", "v_proj"))
    engine = lora_engine(base)
    first = FIRST_IDS["gemma-refusals"]
    shutil.copytree(good, tmp_path / "half")
    file = tmp_path / "half" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    del tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    save_file(tensors, str(file))
    cases = {
        "target module 'kv_a_proj_with_mqa' is not a projection kvrun adapts in "
        "Gemma2ForCausalLM; accepted: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
        "v_proj": _edit(good, tmp_path / "kv", {"target_modules": ["kv_a_proj_with_mqa"]}),
        "layer 0 k_proj has no lora_B weight": str(tmp_path / "half"),
        "target parameter 'experts.gate_up_proj' is not a parameter kvrun adapts in "
        r"Gemma2ForCausalLM; accepted: none \(no parameter": _edit(
            good, tmp_path / "param", {"target_parameters": ["experts.gate_up_proj"]}
        ),
    }
    for i, (message, path) in enumerate(cases.items()):
        with pytest.raises(RequestError, match=message):
            engine.add_lora(LoRARequest(f"bad{i}", first + i, path))
    assert (
        _run(engine, [PROMPTS[0]], [LoRARequest("good", first + 9, str(good))])[0]
        == peft_greedy(base, good, PROMPTS[:1], STEPS)[0]
    )


# -- media LMs: adapters on the language model, encoders refused ------------------------

PIL = pytest.importorskip("PIL.Image")
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe this picture"
AUDIO_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>What do you hear?"
TEXT_PROMPT = "A plain question without any picture"


def _media_checkpoint(kind: str, tokenizer_dir: Path) -> Path:
    from kvrun.testing.checkpoints import (
        build_random_qwen2_audio_checkpoint,
        build_random_qwen2_vl_checkpoint,
    )
    from tests.support.checkpoints import cached_build

    if kind == "qwen2-audio":
        return cached_build(
            "random-qwen2-audio",
            {"seed": 0},
            lambda out: build_random_qwen2_audio_checkpoint(out, tokenizer_dir=tokenizer_dir),
        )
    return cached_build(
        f"random-{kind}",
        {"seed": 0},
        lambda out: build_random_qwen2_vl_checkpoint(
            out, tokenizer_dir=tokenizer_dir, qwen2_5=kind == "qwen2.5-vl"
        ),
    )


def _image(seed: int) -> Any:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return PIL.fromarray(pixels, "RGB")


def _hf_vl_greedy(
    base: Path, adapter: Path | None, text: str, image_seed: int | None, cls: str
) -> list[int]:
    """transformers' greedy tokens with the adapter merged into the weights, on
    ``_image(image_seed)`` (None: text only); cached on disk like peft_greedy."""
    from tests.support.checkpoints import cached_build

    key = {
        "base": str(base),
        "adapter": str(adapter),
        "text": text,
        "image_seed": image_seed,
        "cls": cls,
        "steps": STEPS,
    }

    def build(out: Path) -> Path:
        image = None if image_seed is None else _image(image_seed)
        tokens = _hf_vl_greedy_uncached(base, adapter, text, image, cls)
        (out / "tokens.json").write_text(json.dumps(tokens))
        return out

    tokens: list[int] = json.loads(
        (cached_build("hf-vl-lora-greedy", key, build) / "tokens.json").read_text()
    )
    return tokens


def _hf_vl_greedy_uncached(
    base: Path, adapter: Path | None, text: str, image: Any, cls: str
) -> list[int]:
    import warnings

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    model: Any = getattr(transformers, cls).from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    kwargs: dict[str, Any] = {}
    if image is not None:
        out = Qwen2VLImageProcessorPil.from_pretrained(str(base))(
            images=[image], return_tensors="pt"
        )
        text = text.replace(
            "<|image_pad|>", "<|image_pad|>" * (int(out["image_grid_thw"][0].prod()) // 4)
        )
        kwargs = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if kwargs:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        seq = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            **kwargs,
        )
    return [int(t) for t in seq[0, ids.shape[1] :]]


@pytest.mark.parametrize(
    ("kind", "cls", "targets"),
    [
        ("qwen2-vl", "Qwen2VLForConditionalGeneration", ALL),
        # Qwen2.5-VL's vision MLP has gate/up/down_proj too: a regex keeps to the LM
        (
            "qwen2.5-vl",
            "Qwen2_5_VLForConditionalGeneration",
            r".*language_model.*\.(q_proj|v_proj|o_proj|gate_proj|down_proj)",
        ),
    ],
)
def test_vision_lm_adapters_with_images_equal_transformers_merged(
    kind: str, cls: str, targets: Any, smollm2_hf_dir: Path
) -> None:
    """Image requests with two adapters and none, and a text request with an adapter, in
    one batch: the media rows' step (inputs_embeds) applies each token's adapter."""
    base = _media_checkpoint(kind, smollm2_hf_dir)
    a = make_adapter(base, seed=1, r=8, alpha=16, targets=targets, model_class=cls)
    b = make_adapter(
        base, seed=2, r=4, alpha=8, targets=("k_proj", "v_proj"), model_class=cls, std=0.3
    )
    engine = make_engine(base, enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128)
    media = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": _image(1)}}
    la, lb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    got = _run(engine, [media, media, media, TEXT_PROMPT], [la, lb, None, la])
    want = [
        _hf_vl_greedy(base, a, IMAGE_PROMPT, 1, cls),
        _hf_vl_greedy(base, b, IMAGE_PROMPT, 1, cls),
        _hf_vl_greedy(base, None, IMAGE_PROMPT, 1, cls),
        _hf_vl_greedy(base, a, TEXT_PROMPT, None, cls),
    ]
    assert got == want
    assert len({tuple(w) for w in want[:3]}) == 3, "each adapter must change the output"


def test_encoder_adapters_are_refused_naming_the_module(smollm2_hf_dir: Path) -> None:
    """Adapters PEFT applied to the vision or audio encoder too (q_proj, gate_proj match
    modules there) are refused naming the encoder's module; an LM-only adapter runs."""
    cases = {
        "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", ALL, "model.visual.blocks.0.mlp"),
        "qwen2-audio": (
            "Qwen2AudioForConditionalGeneration",
            ("q_proj", "o_proj"),
            "model.audio_tower.layers.0.self_attn.q_proj",
        ),
    }
    for kind, (cls, targets, module) in cases.items():
        base = _media_checkpoint(kind, smollm2_hf_dir)
        bad = make_adapter(base, seed=3, r=2, targets=targets, model_class=cls)
        engine = make_engine(base, enable_lora=True, max_lora_rank=8, max_model_len=64)
        with pytest.raises(RequestError, match="a module of the media encoder") as info:
            engine.add_request("r", [1, 2, 3], GREEDY, lora_request=LoRARequest("bad", 1, str(bad)))
        assert module in str(info.value), str(info.value)
        assert "language model only" in str(info.value)
    # Qwen2-Audio: adapters on its language model's o/gate/down (no such audio modules)
    good = make_adapter(
        base, seed=4, r=4, targets=("o_proj", "gate_proj", "down_proj"), model_class=cls
    )
    lora = LoRARequest("good", 2, str(good))
    tokens = _run(engine, [PROMPTS[0], PROMPTS[0]], [lora, None])
    assert tokens[0] != tokens[1]


# -- mixtures: attention, dense MLPs, the shared expert and the routed experts ------------

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
_QWEN3_MOE_ARCH, _QWEN3_MOE = PARITY_MODELS["qwen3-moe"]
MOE = {
    "mixtral": PARITY_MODELS["mixtral"],
    # a shared expert, and layer 1 a dense MLP among mixtures
    "qwen2-moe": PARITY_MODELS["qwen2-moe-shared"],
    # the parity test's Qwen3-MoE with layer 0 dense
    "qwen3-moe": (
        _QWEN3_MOE_ARCH,
        {
            **_QWEN3_MOE,
            "extra_config": {**_QWEN3_MOE["extra_config"], "mlp_only_layers": [0]},
        },
    ),
}


def _moe_checkpoint(name: str, random_checkpoint: Callable[..., Path]) -> Path:
    arch, kwargs = MOE[name]
    return random_checkpoint(arch, seed=11, init_std=0.3, num_layers=3, **kwargs)


@pytest.mark.parametrize("name", list(MOE))
def test_mixture_adapters_in_a_mixed_batch_equal_peft(
    name: str, random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any]
) -> None:
    """One adapter on every projection module (attention, dense MLPs, the shared expert)
    and one on the routed experts too (peft's target_parameters, each expert's own A and
    B), beside requests without: each equals peft's."""
    base = _moe_checkpoint(name, random_checkpoint)
    modules = ALL if name != "mixtral" else ALL[:4]  # Mixtral has no dense MLP module
    _check_mixed_batch(
        lora_engine(base),
        base,
        {
            # Qwen3-MoE: peft turns gate/up/down_proj into the experts' fused parameters
            # (target_parameters), gate_up_proj with rank_pattern r=8 and alpha_pattern 16
            "modules": make_adapter(base, seed=1, r=4, alpha=8, targets=modules),
            "experts": make_adapter(
                base,
                seed=2,
                r=4,
                alpha=8,
                targets=("q_proj",),
                target_parameters=EXPERTS if name != "qwen2-moe" else EXPERTS[1:],
                std=0.2,
            ),
        },
        FIRST_IDS["mixed"],
    )


def _v4_expert_adapter(base: Path, *, seed: int, names: tuple[str, str, str], prefix: str) -> Path:
    """An adapter as peft made them on transformers 4, whose experts were modules:
    ``layers.N.<prefix>.experts.E.<gate|up|down>`` with their own A [r, in] and B
    [out, r] (peft converts them to the fused parameters when it loads them on 5)."""
    from safetensors.torch import save_file

    from tests.support.checkpoints import cached_build

    config = json.loads((base / "config.json").read_text())
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = config.get("num_local_experts") or config["num_experts"]

    def build(out: Path) -> Path:
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for e in range(experts):
                for module, (n_in, n_out) in zip(
                    names, ((hidden, inter), (hidden, inter), (inter, hidden)), strict=True
                ):
                    stem = f"base_model.model.model.layers.{layer}.{prefix}.experts.{e}.{module}"
                    tensors[f"{stem}.lora_A.weight"] = 0.2 * torch.randn(2, n_in, generator=g)
                    tensors[f"{stem}.lora_B.weight"] = 0.2 * torch.randn(n_out, 2, generator=g)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 2,
            "lora_alpha": 4,
            "target_modules": list(names),
            "base_model_name_or_path": str(base),
        }
        (out / "adapter_config.json").write_text(json.dumps(adapter_config))
        return out

    key = {"base": str(base), "seed": seed, "names": list(names), "prefix": prefix}
    return cached_build("lora-adapter-v4-experts", key, build)


def test_transformers_4_expert_adapters_equal_peft(
    random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any]
) -> None:
    """Mixtral adapters on block_sparse_moe.experts.E.w1|w3|w2 (transformers 4's modules),
    beside an attention adapter and none: each equals peft's, which fuses them on load."""
    base = _moe_checkpoint("mixtral", random_checkpoint)
    _check_mixed_batch(
        lora_engine(base),
        base,
        {
            "v4": _v4_expert_adapter(
                base, seed=5, names=("w1", "w3", "w2"), prefix="block_sparse_moe"
            ),
            "attention": make_adapter(base, seed=1, r=8, alpha=16, targets=ALL[:4]),
        },
        FIRST_IDS["v4"],
    )


def test_mixture_without_expert_adapters_keeps_the_fused_experts(
    random_checkpoint: Callable[..., Path],
) -> None:
    """Steps whose adapters leave the routed experts alone run the platform's fused_moe,
    with the adapters on attention, the dense layer and the shared expert. An engine of
    its own: on the module's shared engine, after the other tests' expert adapters, this
    check failed once in a cold-cache run of the whole suite and passed alone (session
    11, not yet understood: NOTES.md)."""
    base = _moe_checkpoint("qwen2-moe", random_checkpoint)
    adapter = make_adapter(base, seed=1, r=4, alpha=8, targets=ALL)
    engine = make_engine(base, enable_lora=True, max_lora_rank=8, max_model_len=64)
    lora = LoRARequest("modules", FIRST_IDS["fused-experts"], str(adapter))
    assert engine.lora is not None
    engine.lora.add(lora)
    [slot] = engine.lora.activate([lora.lora_int_id])
    assert engine.lora.batch(torch.tensor([slot])).adapts_experts is False
    got = _run(engine, PROMPTS * 2, [lora, lora, None, None])
    assert got[:2] == peft_greedy(base, adapter, PROMPTS, STEPS)
    assert got[2:] == peft_greedy(base, None, PROMPTS, STEPS)


def _edit(src: Path, dst: Path, config: dict[str, Any]) -> str:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return str(dst)


def test_mixture_refusals_name_the_module(
    random_checkpoint: Callable[..., Path], lora_engine: Callable[[Path], Any], tmp_path: Path
) -> None:
    base = _moe_checkpoint("qwen2-moe", random_checkpoint)
    good = make_adapter(base, seed=3, r=2, targets=("q_proj",), target_parameters=EXPERTS)
    engine = lora_engine(base)
    first = FIRST_IDS["mixture-refusals"]
    cases = {
        "target parameter 'mlp.gate.weight' is not a parameter kvrun adapts in "
        "Qwen2MoeForCausalLM; accepted: experts.gate_up_proj, experts.down_proj": _edit(
            good, tmp_path / "router", {"target_parameters": ["mlp.gate.weight"]}
        ),
        "target module 'shared_expert_gate' is not a projection kvrun adapts": _edit(
            good, tmp_path / "gate", {"target_modules": ["q_proj", "shared_expert_gate"]}
        ),
    }
    for i, (message, path) in enumerate(cases.items()):
        with pytest.raises(RequestError, match=message):
            engine.add_request(
                f"r{i}", [1, 2], GREEDY, lora_request=LoRARequest("x", first + i, path)
            )
    # a dense module's weights in a mixture layer (layer 0): refused by layer and name
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, tmp_path / "dense")
    file = tmp_path / "dense" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] = tensors.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )[:, :48].contiguous()
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] = tensors.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    )
    save_file(tensors, str(file))
    with pytest.raises(RequestError, match="layer 0 of Qwen2MoeForCausalLM has no down_proj"):
        engine.add_lora(LoRARequest("dense", first + 9, str(tmp_path / "dense")))
