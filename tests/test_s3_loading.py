"""Models from S3: ``LLM(model="s3://bucket/prefix")`` against a real S3 endpoint (moto's
standalone server, authentication on), through a proxy that counts every request.

Loads equal the local directory's; a reload downloads nothing; a changed or damaged
object is fetched again; every failure (credentials, bucket, prefix, a cut-off
transfer, an unreachable endpoint, boto3 missing) is one clear ModelLoadError.
"""

from __future__ import annotations

import filecmp
import logging
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvrun import LLM
from kvrun.envs import read_env
from kvrun.errors import ModelLoadError
from kvrun.loader import Checkpoint, S3Settings, load_checkpoint
from kvrun.sampling_params import SamplingParams
from tests.support.checkpoints import cache_name, cached_build
from tests.support.logs import kvrun_log
from tests.support.publish_checkpoints import publish_checkpoints
from tests.support.s3 import MotoServer, S3Proxy, upload_directory

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(100, 130))]
ENGINE: dict[str, Any] = {"max_model_len": 256, "num_kv_blocks": 64, "dtype": "float32"}


@pytest.fixture(autouse=True)
def _no_ambient_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3 must see only what the test gives it, never this machine's AWS set-up."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def source(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)


@pytest.fixture
def bucket(s3_bucket: str) -> str:
    return s3_bucket


@pytest.fixture
def proxy(s3_proxy: S3Proxy) -> S3Proxy:
    return s3_proxy


def _settings(moto: MotoServer, endpoint: str, cache: Path, **kwargs: Any) -> S3Settings:
    kwargs.setdefault("access_key_id", moto.access_key_id)
    kwargs.setdefault("secret_access_key", moto.secret_access_key)
    return S3Settings(cache_dir=cache, endpoint_url=endpoint, **kwargs)


def _load(uri: str, settings: S3Settings, **kwargs: Any) -> Checkpoint:
    return load_checkpoint(uri, hf_hub_offline=True, use_modelscope=False, s3=settings, **kwargs)


def _tokens(llm: LLM) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_llm_from_s3_generates_like_the_local_directory_and_reloads_from_cache(
    moto: MotoServer,
    proxy: S3Proxy,
    bucket: str,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = upload_directory(moto.client(), bucket, "models/tiny", source)
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("S3_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", moto.secret_access_key)
    # The real VLLM_CACHE_ROOT (the cpu kernels are built there): this bucket's mirror
    # is new, and removed at the end.
    mirror = Path(read_env().VLLM_CACHE_ROOT) / "s3" / bucket
    try:
        with kvrun_log(logging.INFO) as messages:
            first = LLM(model=f"s3://{bucket}/models/tiny", **ENGINE)
        assert first.llm_engine.config.model_name == f"s3://{bucket}/models/tiny"
        assert _tokens(first) == _tokens(LLM(model=str(source), **ENGINE))
        assert sorted(r.key for r in proxy.object_gets()) == keys  # each object once
        assert any("downloaded 6 of 6 objects" in m for m in messages)
        assert sorted(
            p.name for p in (mirror / "models" / "tiny").iterdir() if p.name[0] != "."
        ) == [k.rpartition("/")[2] for k in keys]
        proxy.reset()
        with kvrun_log(logging.DEBUG) as again:
            second = LLM(model=f"s3://{bucket}/models/tiny/", **ENGINE)
        assert proxy.object_gets() == []  # listed only: every ETag was unchanged
        assert any("downloaded 0 of 6 objects (0.0 MiB)" in m for m in again)
        assert _tokens(second) == _tokens(first)
        for secret in (moto.secret_access_key, moto.access_key_id):
            assert not any(secret in m for m in messages + again)
    finally:
        shutil.rmtree(mirror, ignore_errors=True)


def test_a_changed_object_is_fetched_again_and_a_deleted_one_dropped(
    moto: MotoServer, proxy: S3Proxy, bucket: str, source: Path, tmp_path: Path
) -> None:
    client = moto.client()
    upload_directory(client, bucket, "m", source)
    client.put_object(Bucket=bucket, Key="m/notes.txt", Body=b"v1")
    settings = _settings(moto, proxy.url, tmp_path)
    first = _load(f"s3://{bucket}/m", settings)
    assert (first.directory / "notes.txt").read_bytes() == b"v1"
    client.put_object(Bucket=bucket, Key="m/generation_config.json", Body=b'{"max_length": 7}')
    client.delete_object(Bucket=bucket, Key="m/notes.txt")
    proxy.reset()
    again = _load(f"s3://{bucket}/m", settings)
    assert [r.key for r in proxy.object_gets()] == ["m/generation_config.json"]
    assert again.generation_config == {"max_length": 7}
    assert not (again.directory / "notes.txt").exists()


def test_a_damaged_cached_file_is_fetched_again(
    moto: MotoServer, proxy: S3Proxy, bucket: str, source: Path, tmp_path: Path
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    settings = _settings(moto, proxy.url, tmp_path)
    weights = _load(f"s3://{bucket}/m", settings).directory / "model.safetensors"
    with weights.open("r+b") as fh:  # as a disk-full or a killed copy would leave it
        fh.truncate(weights.stat().st_size // 2)
    proxy.reset()
    checkpoint = _load(f"s3://{bucket}/m", settings)
    assert [r.key for r in proxy.object_gets()] == ["m/model.safetensors"]
    assert filecmp.cmp(checkpoint.weight_files[0], source / "model.safetensors", shallow=False)


def test_large_objects_come_in_ranged_parts(
    moto: MotoServer, proxy: S3Proxy, bucket: str, source: Path, tmp_path: Path
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    size = (source / "model.safetensors").stat().st_size
    part = 1 << 20
    settings = _settings(moto, proxy.url, tmp_path, part_size=part, max_concurrency=3)
    checkpoint = _load(f"s3://{bucket}/m", settings)
    ranges = sorted(r.range or "" for r in proxy.object_gets("model.safetensors"))
    expected = [f"bytes={a}-{min(a + part, size) - 1}" for a in range(0, size, part)]
    assert len(expected) > 3
    assert ranges == sorted(expected)
    assert filecmp.cmp(checkpoint.weight_files[0], source / "model.safetensors", shallow=False)


def test_a_transfer_cut_short_is_an_error_and_leaves_no_file(
    moto: MotoServer,
    proxy: S3Proxy,
    bucket: str,
    source: Path,
    tmp_path: Path,
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    proxy.cut.add("m/model.safetensors")
    settings = _settings(moto, proxy.url, tmp_path, max_attempts=2)
    size = (source / "model.safetensors").stat().st_size
    with pytest.raises(ModelLoadError) as info:
        _load(f"s3://{bucket}/m", settings)
    assert str(info.value) == (
        f"model 's3://{bucket}/m': object 'm/model.safetensors' is truncated: bytes "
        f"0-{size - 1} of its {size} (the listing's ContentLength) arrived as {size // 2} "
        "bytes, 2 times; check the store, then load again"
    )
    assert len(proxy.object_gets("model.safetensors")) == 2  # retried once
    mirror = tmp_path / bucket / "m"
    assert not (mirror / "model.safetensors").exists()
    assert [p.name for p in mirror.iterdir() if "kvrun-part" in p.name] == []
    # once the store serves it whole, the next load completes
    proxy.cut.clear()
    assert _load(f"s3://{bucket}/m", settings).format == "safetensors"


@pytest.mark.parametrize("wrong", ["key id", "secret"])
def test_wrong_credentials_are_a_clear_error_that_shows_none(
    moto: MotoServer,
    bucket: str,
    source: Path,
    tmp_path: Path,
    wrong: str,
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    bad_key, bad_secret = "AKIAWRONGWRONGWRONG1", "wrong-secret-5c9f2e"
    settings = (
        _settings(moto, moto.url, tmp_path, access_key_id=bad_key, secret_access_key=bad_secret)
        if wrong == "key id"
        else _settings(moto, moto.url, tmp_path, secret_access_key=bad_secret)
    )
    code = "InvalidAccessKeyId" if wrong == "key id" else "SignatureDoesNotMatch"
    with kvrun_log(logging.DEBUG) as messages, pytest.raises(ModelLoadError) as info:
        _load(f"s3://{bucket}/m", settings)
    assert str(info.value) == (
        f"model 's3://{bucket}/m': {moto.url} refused access to bucket {bucket!r} ({code}): "
        "check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY (when unset, boto3 uses its own "
        "credentials: AWS_* variables, ~/.aws, an instance role) and that they may list and "
        "read the bucket"
    )
    for secret in (bad_secret, moto.secret_access_key, bad_key):
        assert secret not in str(info.value)
        assert not any(secret in m for m in messages)
    assert not (tmp_path / bucket / "m" / "config.json").exists()


def test_missing_bucket_prefix_and_config(
    moto: MotoServer, bucket: str, source: Path, tmp_path: Path
) -> None:
    settings = _settings(moto, moto.url, tmp_path)
    with pytest.raises(ModelLoadError) as info:
        _load("s3://kvrun-no-such-bucket/m", settings)
    assert str(info.value) == (
        f"model 's3://kvrun-no-such-bucket/m': bucket 'kvrun-no-such-bucket' does not exist "
        f"at {moto.url}"
    )
    with pytest.raises(ModelLoadError) as info:
        _load(f"s3://{bucket}/nothing/here", settings)
    assert str(info.value) == (
        f"model 's3://{bucket}/nothing/here': there are no objects under "
        f"s3://{bucket}/nothing/here/ at {moto.url}; give the prefix that holds config.json"
    )
    moto.client().put_object(Bucket=bucket, Key="half/model.safetensors", Body=b"x")
    moto.client().put_object(Bucket=bucket, Key="half/README.md", Body=b"x")
    with pytest.raises(ModelLoadError) as info:
        _load(f"s3://{bucket}/half", settings)
    assert str(info.value) == (
        f"model 's3://{bucket}/half': the objects under it (README.md, model.safetensors) "
        "include no config.json, so it is not a Hugging Face checkpoint; give the prefix "
        "that holds config.json"
    )
    with pytest.raises(ModelLoadError, match="is not an S3 bucket name"):
        _load("s3://Bad_Bucket!/m", settings)


def test_an_unreachable_endpoint_fails_within_bounded_time(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = S3Settings(
        cache_dir=tmp_path,
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="AKIAEXAMPLEEXAMPLE01",
        secret_access_key="example-secret",
    )
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        _load("s3://some-bucket/m", settings)
    assert time.monotonic() - start < 20
    assert str(info.value) == (
        f"model 's3://some-bucket/m': cannot reach the S3 endpoint http://127.0.0.1:{port} "
        "(EndpointConnectionError, after 3 attempts of 5 s); check S3_ENDPOINT_URL and the "
        "network"
    )


def test_dummy_and_tokenizer_only_loads_fetch_no_weights(
    moto: MotoServer, proxy: S3Proxy, bucket: str, source: Path, tmp_path: Path
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    settings = _settings(moto, proxy.url, tmp_path)
    checkpoint = _load(f"s3://{bucket}/m", settings, load_format="dummy")
    assert checkpoint.format == "dummy"
    tokenizer_only = _load(f"s3://{bucket}/m", settings, weights=False)
    assert tokenizer_only.format == "none"
    assert proxy.object_gets("model.safetensors") == []
    assert len(proxy.object_gets()) == 5
    with pytest.raises(ModelLoadError, match=r"load_format='pt' reads PyTorch \*.bin"):
        _load(f"s3://{bucket}/m", settings, load_format="pt")


def test_concurrent_loads_download_each_object_once(
    moto: MotoServer, proxy: S3Proxy, bucket: str, source: Path, tmp_path: Path
) -> None:
    upload_directory(moto.client(), bucket, "m", source)
    settings = _settings(moto, proxy.url, tmp_path)
    results: list[Any] = []

    def load() -> None:
        try:
            results.append(_load(f"s3://{bucket}/m", settings).num_tensors)
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and len(set(results)) == 1 and isinstance(results[0], int)
    assert len(proxy.object_gets()) == 6


def test_s3_without_boto3_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if it were not installed
    with pytest.raises(ModelLoadError) as info:
        _load("s3://some-bucket/m", S3Settings(cache_dir=tmp_path))
    assert str(info.value) == (
        "model 's3://some-bucket/m' is on S3, which needs boto3: pip install \"kvrun[s3]\""
    )


def test_ci_use_s3_fetches_test_checkpoints_instead_of_building_them(
    moto: MotoServer, bucket: str, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = {"arch": "llama", "seed": 7}
    upload_directory(moto.client(), bucket, cache_name("random-llama", key), source)
    monkeypatch.setenv("VLLM_CI_USE_S3", "1")
    monkeypatch.setenv("KVRUN_TEST_S3_BUCKET", bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("S3_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", moto.secret_access_key)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))

    def build(out: Path) -> Path:
        raise AssertionError("built locally although VLLM_CI_USE_S3=1")

    got = cached_build("random-llama", key, build, ci_s3=True)
    assert got == tmp_path / "s3" / bucket / cache_name("random-llama", key)
    assert sorted(p.name for p in got.iterdir() if p.name[0] != ".") == sorted(
        p.name for p in source.iterdir()
    )
    with pytest.raises(pytest.fail.Exception, match="VLLM_CI_USE_S3=1 but"):
        cached_build("random-llama", {"arch": "llama", "seed": 8}, build, ci_s3=True)


def test_publish_uploads_the_checkpoints_a_run_built_for_ci_to_fetch(
    moto: MotoServer, bucket: str, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests.support.publish_checkpoints puts each built checkpoint (and nothing else of
    the test cache) where VLLM_CI_USE_S3=1 looks for it, once."""
    key = {"arch": "llama", "seed": 7}
    root = tmp_path / "test-cache"
    root.mkdir()
    shutil.copytree(source, root / cache_name("random-llama", key))
    (root / "hf-greedy-0123456789abcdef").mkdir()  # a reference output, not a checkpoint
    (root / "hf-greedy-0123456789abcdef" / "reference.json").write_text("{}")
    client = moto.client()
    assert publish_checkpoints(client, bucket, root) == [cache_name("random-llama", key)]
    assert publish_checkpoints(client, bucket, root) == []  # already there
    monkeypatch.setenv("VLLM_CI_USE_S3", "1")
    monkeypatch.setenv("KVRUN_TEST_S3_BUCKET", bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("S3_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", moto.secret_access_key)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "cache-root"))

    def build(out: Path) -> Path:
        raise AssertionError("built locally although VLLM_CI_USE_S3=1")

    got = cached_build("random-llama", key, build, ci_s3=True)
    assert sorted(p.name for p in got.iterdir() if p.name[0] != ".") == sorted(
        p.name for p in source.iterdir()
    )
