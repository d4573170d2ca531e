"""No variable is silently ignored: each is honoured somewhere or named with the reason."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvrun import envs
from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.env_effects import EFFECTS, ineffective
from kvrun.errors import ConfigError


def test_every_variable_has_an_effect_or_a_reason() -> None:
    assert set(EFFECTS) == {v.name for v in envs.VARIABLES}
    for name, effect in EFFECTS.items():
        assert effect.reads or effect.why_not, name
        if not effect.honoured:
            assert not effect.platforms and not effect.entry_points, name


def test_defaults_are_never_news() -> None:
    assert ineffective(envs.read_env({}), "cpu", "offline") == []


def test_variables_without_a_feature_are_named_on_every_platform() -> None:
    env = envs.read_env({"VLLM_AUDIO_FETCH_TIMEOUT": "5", "VLLM_DP_SIZE": "2"})
    for platform in ("cpu", "openvino", "cuda", "acme"):
        named = dict(ineffective(env, platform, "offline"))
        assert sorted(named) == ["VLLM_AUDIO_FETCH_TIMEOUT", "VLLM_DP_SIZE"]
        assert named["VLLM_AUDIO_FETCH_TIMEOUT"].startswith("it acts only under kvrun serve")
        assert named["VLLM_DP_SIZE"].startswith("it acts only under kvrun serve")


def test_another_platform_s_variable_names_the_platform_that_reads_it() -> None:
    env = envs.read_env({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_OPENVINO_KVCACHE_SPACE": "2"})
    assert ineffective(env, "cpu", "offline") == [
        (
            "VLLM_OPENVINO_KVCACHE_SPACE",
            "the selected platform is cpu: only the openvino platform reads it",
        )
    ]
    assert ineffective(env, "openvino", "offline") == [
        (
            "VLLM_CPU_KVCACHE_SPACE",
            "the selected platform is openvino: only the cpu platform reads it",
        )
    ]
    # A vendor platform that reads it says so, and is not contradicted.
    assert ineffective(env, "acme", "offline", {"VLLM_CPU_KVCACHE_SPACE"})[0][0] == (
        "VLLM_OPENVINO_KVCACHE_SPACE"
    )


def test_server_variables_are_named_offline_only() -> None:
    env = envs.read_env({"VLLM_API_KEY": "k", "VLLM_RPC_TIMEOUT": "5000"})
    assert ineffective(env, "cpu", "serve") == []
    named = dict(ineffective(env, "cpu", "offline"))
    assert sorted(named) == ["VLLM_API_KEY", "VLLM_RPC_TIMEOUT"]
    assert named["VLLM_RPC_TIMEOUT"] == (
        "it acts only under kvrun serve (the server's utility calls to the engine), "
        "not here (offline)"
    )


def test_the_engine_names_each_once_at_start(
    random_checkpoint: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    environ = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM": "1",
        "S3_ACCESS_KEY_ID": "key",  # honoured (loading s3:// models): not named
        "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # honoured on cpu: not named
        "VLLM_API_KEY": "secret",  # honoured by the server's engine: not named there
    }
    args = EngineArgs(model=str(random_checkpoint("llama", seed=0)), max_model_len=128)
    with caplog.at_level(logging.WARNING, logger="kvrun.envs"):
        LLMEngine.from_args(args, envs.read_env(environ), entry_point="serve")
    named = [r.getMessage().split(" ")[0] for r in caplog.records if r.name == "kvrun.envs"]
    assert sorted(named) == [
        "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE",
        "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM",
    ]
    assert len(named) == len(set(named))
    assert "secret" not in caplog.text


def test_vllm_use_v1_zero_asks_for_an_engine_kvrun_lacks() -> None:
    with pytest.raises(ConfigError) as raised:
        envs.read_env({"VLLM_USE_V1": "0"})
    assert str(raised.value).startswith(
        "VLLM_USE_V1=0 asks for vLLM's V0 engine, which kvrun does not have"
    )
    assert envs.read_env({"VLLM_USE_V1": "1"}).VLLM_USE_V1 is True
    assert envs.read_env({}).VLLM_USE_V1 is False  # the seed's default; no error


def test_kvrun_env_shows_the_effect_column(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", "env", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["VLLM_CPU_KVCACHE_SPACE"]["effect"] == "the KV-cache budget (platform cpu only)"
    assert rows["VLLM_CPU_KVCACHE_SPACE"]["honoured"] is True
    ray_overlap = rows["VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL"]
    assert ray_overlap["honoured"] is False
    assert ray_overlap["effect"].startswith("no effect yet: ")
