"""Load formats (vLLM's ``load_format``), VLLM_TEST_FORCE_LOAD_FORMAT and trust_remote_code.

The safetensors load of a random checkpoint is the oracle: the same weights saved as
PyTorch ``.bin`` files (whole, sharded, legacy format) load to equal tensors and
generate the same greedy tokens. A pickle that would run code is refused before it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kvrun import LLM
from kvrun.config import EngineArgs
from kvrun.errors import ConfigError, ModelLoadError
from kvrun.loader import Checkpoint, load_checkpoint
from kvrun.sampling_params import SamplingParams
from tests.support.engine import make_engine, run_all
from tests.support.logs import kvrun_log

PROMPTS = [list(range(100, 140)), [1, 504, 3458, 282, 4649, 314]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE: dict[str, Any] = {"max_model_len": 256, "num_kv_blocks": 64}


def _load(model: str | Path, **kwargs: Any) -> Checkpoint:
    kwargs.setdefault("hf_hub_offline", True)
    kwargs.setdefault("use_modelscope", False)
    return load_checkpoint(str(model), **kwargs)


def _weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return dict(checkpoint.iter_weights(torch.float32, progress=False))


def _greedy(model: Path, **kwargs: Any) -> list[list[int]]:
    engine = make_engine(model, **ENGINE, **kwargs)
    return [list(o.outputs[0].token_ids) for o in run_all(engine, PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def source(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)


def _without_weights(source: Path, out: Path) -> Path:
    """``source``'s config, tokenizer and generation files, no weights."""
    out.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy(path, out / path.name)
    return out


def _as_pt(source: Path, out: Path, *, shards: int = 1, legacy: bool = False) -> Path:
    """``source`` with its weights saved by torch.save: one pytorch_model.bin, or
    ``shards`` files and a pytorch_model.bin.index.json."""
    _without_weights(source, out)
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return out
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, out / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out


# --- pt ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shards", "legacy"), [(1, False), (3, False), (1, True)])
def test_pt_weights_equal_the_safetensors_load(
    source: Path, tmp_path: Path, shards: int, legacy: bool
) -> None:
    pt_dir = _as_pt(source, tmp_path / "pt", shards=shards, legacy=legacy)
    for load_format in ("pt", "auto"):
        checkpoint = _load(pt_dir, load_format=load_format)
        assert checkpoint.format == "pt"
        assert len(checkpoint.weight_files) == shards
        expected = _weights(_load(source))
        got = _weights(checkpoint)
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("shards", [1, 3])
def test_pt_checkpoint_generates_the_safetensors_tokens(
    source: Path, tmp_path: Path, shards: int
) -> None:
    pt_dir = _as_pt(source, tmp_path / "pt", shards=shards)
    assert _greedy(pt_dir, load_format="pt") == _greedy(source, load_format="safetensors")


def test_a_pickle_that_runs_code_is_refused_and_never_runs(source: Path, tmp_path: Path) -> None:
    pt_dir = _without_weights(source, tmp_path / "evil")
    marker = tmp_path / "pwned"
    # Written by a separate interpreter: the class behind the payload must not exist here.
    payload = (
        "import os, sys, torch\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {marker}',))\n"
        "torch.save({'model.norm.weight': torch.ones(64), 'x': Payload()}, sys.argv[1])\n"
    )
    weights = pt_dir / "pytorch_model.bin"
    subprocess.run([sys.executable, "-c", payload, str(weights)], check=True)
    for load_format in ("pt", "auto"):
        with pytest.raises(ModelLoadError) as info:
            _load(pt_dir, load_format=load_format)
        message = str(info.value)
        assert message.startswith(f"{weights}: refused: this pickle needs more than tensors")
        assert "system" in message  # the global it asked for
        assert "never runs code from a checkpoint" in message
    with pytest.raises(ModelLoadError, match="refused"):
        LLM(model=str(pt_dir), load_format="pt")
    assert not marker.exists()


def test_a_pt_file_of_other_objects_is_refused(source: Path, tmp_path: Path) -> None:
    pt_dir = _without_weights(source, tmp_path / "odd")
    torch.save({"model.norm.weight": torch.ones(64), "step": 3}, pt_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        _load(pt_dir)
    assert str(info.value) == (
        f"{pt_dir / 'pytorch_model.bin'} holds a dict whose 'step' is a int; a weights file "
        "holds a flat dict of name -> tensor (a model's state_dict())"
    )


def test_training_files_beside_the_weights_are_not_read(source: Path, tmp_path: Path) -> None:
    pt_dir = _as_pt(source, tmp_path / "pt")
    (pt_dir / "training_args.bin").write_bytes(b"not even a pickle")
    checkpoint = _load(pt_dir)
    assert checkpoint.weight_files == (pt_dir / "pytorch_model.bin",)


# --- formats that do not match the files ------------------------------------------------


def test_auto_prefers_safetensors_over_pt(source: Path, tmp_path: Path) -> None:
    both = _as_pt(source, tmp_path / "both")
    shutil.copy(source / "model.safetensors", both / "model.safetensors")
    assert _load(both).format == "safetensors"
    assert _load(both, load_format="pt").format == "pt"


def test_a_format_the_files_do_not_have_is_a_clear_error(source: Path, tmp_path: Path) -> None:
    pt_dir = _as_pt(source, tmp_path / "pt")
    with pytest.raises(ModelLoadError) as info:
        _load(pt_dir, load_format="safetensors")
    assert str(info.value) == (
        f"model {str(pt_dir)!r}: directory {pt_dir}: load_format='safetensors' reads "
        "*.safetensors files, but it holds pytorch_model.bin (pt); load_format='auto' picks "
        "whichever the directory holds (load formats: auto, safetensors, pt, gguf, dummy)"
    )
    with pytest.raises(ModelLoadError) as info:
        _load(source, load_format="pt")
    assert "load_format='pt' reads PyTorch *.bin / *.pt files, but it holds model.safetensors" in (
        str(info.value)
    )
    with pytest.raises(ModelLoadError) as info:
        _load(source, load_format="gguf")
    assert "load_format='gguf' reads a single .gguf file given by its own path" in str(info.value)
    empty = _without_weights(source, tmp_path / "empty")
    with pytest.raises(ModelLoadError) as info:
        _load(empty)
    assert str(info.value) == (
        f"model {str(empty)!r}: directory {empty}: load_format='auto' reads *.safetensors, "
        "else PyTorch *.bin / *.pt files, but it holds no weight files (load formats: auto, "
        "safetensors, pt, gguf, dummy)"
    )


def test_a_gguf_file_loads_only_as_gguf(smollm2_gguf_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        _load(smollm2_gguf_path, load_format="safetensors")
    assert str(info.value) == (
        f"model {str(smollm2_gguf_path)!r} is a file; load_format='safetensors' reads a "
        "Hugging Face directory (config.json and weights); a .gguf file loads with "
        "load_format 'auto' or 'gguf'"
    )


def test_an_unknown_load_format_lists_the_accepted_ones(source: Path) -> None:
    accepted = "accepted: auto, safetensors, pt, gguf, dummy"
    with pytest.raises(ConfigError) as info:
        EngineArgs(model=str(source), load_format="npcache")
    assert str(info.value) == f"load_format 'npcache' is not known; {accepted}"
    with pytest.raises(ConfigError, match=accepted):
        LLM(model=str(source), load_format="tensorizer")
    with pytest.raises(ConfigError, match=accepted):
        _load(source, load_format="bin")


# --- dummy ------------------------------------------------------------------------------


def test_dummy_needs_no_weight_files_and_is_deterministic(source: Path, tmp_path: Path) -> None:
    bare = _without_weights(source, tmp_path / "bare")
    checkpoint = _load(bare, load_format="dummy", dummy_seed=3)
    assert (checkpoint.format, checkpoint.weight_files) == ("dummy", ())
    weights = _weights(checkpoint)
    real = _weights(_load(source))
    assert {n: t.shape for n, t in weights.items()} == {n: t.shape for n, t in real.items()}
    assert all(torch.equal(t, _weights(checkpoint)[n]) for n, t in weights.items())
    other = _weights(_load(bare, load_format="dummy", dummy_seed=4))
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"], weights[
        "model.layers.0.self_attn.q_proj.weight"
    ])  # fmt: skip
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    assert float(weights["model.embed_tokens.weight"].abs().max()) < 0.2  # N(0, 0.02)
    in_bf16 = dict(checkpoint.iter_weights(torch.bfloat16, progress=False))
    assert all(t.dtype == torch.bfloat16 for t in in_bf16.values())
    # a directory that has weights reads none of them
    assert _weights(_load(source, load_format="dummy", dummy_seed=3)).keys() == weights.keys()


def test_dummy_generates_the_same_tokens_for_the_same_seed(source: Path, tmp_path: Path) -> None:
    bare = _without_weights(source, tmp_path / "bare")
    first = _greedy(bare, load_format="dummy", seed=1)
    assert [len(t) for t in first] == [12, 12]
    assert _greedy(bare, load_format="dummy", seed=1) == first
    out = LLM(model=str(bare), load_format="dummy", dtype="float32", **ENGINE).generate(
        "Hello", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 5


def test_force_load_format_variable_overrides_the_argument(source: Path, tmp_path: Path) -> None:
    bare = _without_weights(source, tmp_path / "bare")
    forced = {"VLLM_TEST_FORCE_LOAD_FORMAT": "dummy"}
    with kvrun_log(logging.INFO) as messages:
        engine = make_engine(bare, env=forced, load_format="safetensors", seed=1, **ENGINE)
    assert engine.config.load_format == "dummy"
    assert "VLLM_TEST_FORCE_LOAD_FORMAT=dummy overrides load_format='safetensors'" in messages
    assert _greedy(bare, env=forced, load_format="safetensors", seed=1) == _greedy(
        bare, load_format="dummy", seed=1
    )
    # unset, its default ("dummy") forces nothing
    assert "VLLM_TEST_FORCE_LOAD_FORMAT" not in os.environ
    with pytest.raises(ModelLoadError, match="holds no weight files"):
        make_engine(bare, **ENGINE)
    with pytest.raises(ConfigError) as info:
        make_engine(source, env={"VLLM_TEST_FORCE_LOAD_FORMAT": "npcache"}, **ENGINE)
    assert str(info.value) == (
        "VLLM_TEST_FORCE_LOAD_FORMAT 'npcache' is not known; accepted: auto, safetensors, pt, "
        "gguf, dummy"
    )


# --- trust_remote_code ------------------------------------------------------------------


def _with_auto_map(source: Path, out: Path, architecture: str) -> tuple[Path, Path]:
    """``source`` whose config.json asks for its own code, and the marker that code
    would create if anything ran it."""
    shutil.copytree(source, out)
    marker = out.parent / f"{out.name}-code-ran"
    (out / "modeling_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass CustomForCausalLM: ...\n"
    )
    (out / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    )
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = [architecture]
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out, marker


def test_auto_map_is_refused_without_trust_remote_code(source: Path, tmp_path: Path) -> None:
    model, marker = _with_auto_map(source, tmp_path / "custom", "LlamaForCausalLM")
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(model), **ENGINE)
    assert str(info.value) == (
        f"model {str(model)!r}: its config.json has an 'auto_map' (configuration_custom."
        "CustomConfig, modeling_custom.CustomForCausalLM): it asks for the checkpoint's own "
        "Python code, and kvrun never runs a checkpoint's code. Its architecture "
        "LlamaForCausalLM is one kvrun implements natively: pass trust_remote_code=True "
        "(--trust-remote-code) to load it with kvrun's own implementation instead (supported "
        "natively: " + str(info.value).rpartition("supported natively: ")[2]
    )
    natively = str(info.value).rpartition("supported natively: ")[2]
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"} <= set(
        natively.rstrip(")").split(", ")
    )
    assert not marker.exists()


def test_trust_remote_code_loads_a_native_architecture_natively(
    source: Path, tmp_path: Path
) -> None:
    model, marker = _with_auto_map(source, tmp_path / "custom", "LlamaForCausalLM")
    with kvrun_log(logging.WARNING) as messages:
        tokens = _greedy(model, trust_remote_code=True)
    assert tokens == _greedy(source)
    notes = [m for m in messages if "auto_map" in m]
    assert len(notes) == 1
    assert "kvrun never runs a checkpoint's code" in notes[0]
    assert "LlamaForCausalLM is loaded with kvrun's own implementation" in notes[0]
    assert not marker.exists()


def test_trust_remote_code_cannot_load_an_architecture_kvrun_lacks(
    source: Path, tmp_path: Path
) -> None:
    model, marker = _with_auto_map(source, tmp_path / "custom", "CustomForCausalLM")
    with pytest.raises(ModelLoadError) as info:
        _load(model, trust_remote_code=True)
    assert "Its architecture 'CustomForCausalLM' is not one kvrun implements natively" in str(
        info.value
    )
    assert str(info.value).endswith("so it cannot be loaded")
    assert not marker.exists()


def test_serve_flags_reach_the_engine_args() -> None:
    import argparse

    from kvrun.cli import serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    args = parser.parse_args(["--load-format", "pt", "--trust-remote-code"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.load_format, engine_args.trust_remote_code) == ("pt", True)
    defaults = EngineArgs.from_cli_args(parser.parse_args([]))
    assert (defaults.load_format, defaults.trust_remote_code) == ("auto", False)
