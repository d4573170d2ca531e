"""The VLLM_* registry: coverage of vLLM's list, defaults, parsing and its errors."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kvrun import envs
from kvrun.cli.env_cmd import markdown_table
from kvrun.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "reference" / "vllm-envs-seed.txt"
HOME = "/home/u"
BOOL_ACCEPTED = "accepted: 1/0, true/false, yes/no or on/off, in any case"

# The four variables vLLM's list shows only by meaning (computed paths).
BY_MEANING = {"VLLM_CONFIG_ROOT", "VLLM_CACHE_ROOT", "VLLM_ASSETS_CACHE", "VLLM_XLA_CACHE_PATH"}
# Upper-case quoted words in the seed that are values, not variable names.
SEED_VALUES = {"CPU", "FLASHINFER", "FLASH_ATTN", "INFO", "ROCM_FLASH", "TORCH_SDPA", "XFORMERS"}

# name -> default, read from {"HOME": HOME}; vLLM's defaults but for the kvrun dirs.
DEFAULTS: dict[str, Any] = {
    "MAX_JOBS": None,
    "NVCC_THREADS": None,
    "VLLM_USE_PRECOMPILED": False,
    "CMAKE_BUILD_TYPE": None,
    "VERBOSE": False,
    "VLLM_CONFIG_ROOT": f"{HOME}/.config/kvrun",
    "VLLM_TARGET_DEVICE": None,
    "VLLM_CACHE_ROOT": f"{HOME}/.cache/kvrun",
    "VLLM_HOST_IP": "",
    "VLLM_PORT": None,
    "VLLM_RPC_BASE_PATH": tempfile.gettempdir(),
    "VLLM_USE_MODELSCOPE": False,
    "VLLM_RINGBUFFER_WARNING_INTERVAL": 60,
    "VLLM_TEST_DYNAMO_FULLGRAPH_CAPTURE": True,
    "LOCAL_RANK": 0,
    "VLLM_ENGINE_ITERATION_TIMEOUT_S": 60,
    "VLLM_API_KEY": None,
    "S3_ACCESS_KEY_ID": None,
    "S3_SECRET_ACCESS_KEY": None,
    "S3_ENDPOINT_URL": None,
    "HF_HUB_OFFLINE": False,
    "VLLM_USAGE_STATS_SERVER": "https://stats.vllm.ai",
    "VLLM_NO_USAGE_STATS": False,
    "DO_NOT_TRACK": False,
    "VLLM_DO_NOT_TRACK": False,
    "VLLM_USAGE_SOURCE": "production",
    "VLLM_CONFIGURE_LOGGING": True,
    "VLLM_LOGGING_CONFIG_PATH": None,
    "VLLM_LOGGING_LEVEL": "INFO",
    "VLLM_LOGGING_PREFIX": "",
    "VLLM_LOGITS_PROCESSOR_THREADS": None,
    "VLLM_TRACE_FUNCTION": False,
    "VLLM_ATTENTION_BACKEND": None,
    "VLLM_PP_LAYER_PARTITION": None,
    "VLLM_USE_RAY_SPMD_WORKER": False,
    "VLLM_USE_RAY_COMPILED_DAG": False,
    "VLLM_USE_RAY_COMPILED_DAG_NCCL_CHANNEL": True,
    "VLLM_USE_RAY_COMPILED_DAG_OVERLAP_COMM": False,
    "VLLM_WORKER_MULTIPROC_METHOD": "fork",
    "VLLM_ASSETS_CACHE": f"{HOME}/.cache/kvrun/assets",
    "VLLM_IMAGE_FETCH_TIMEOUT": 5,
    "VLLM_VIDEO_FETCH_TIMEOUT": 30,
    "VLLM_AUDIO_FETCH_TIMEOUT": 10,
    "VLLM_MM_INPUT_CACHE_SIZE": 256,
    "VLLM_FUSED_MOE_CHUNK_SIZE": 32768,
    "VLLM_NO_DEPRECATION_WARNING": False,
    "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": False,
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": False,
    "VLLM_TEST_FORCE_LOAD_FORMAT": "dummy",
    "VLLM_RPC_TIMEOUT": 10000,
    "VLLM_PLUGINS": None,
    "VLLM_TORCH_PROFILER_DIR": None,
    "VLLM_USE_TRITON_AWQ": False,
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": False,
    "VLLM_DISABLED_KERNELS": [],
    "VLLM_USE_V1": False,
    "K_SCALE_CONSTANT": 200,
    "V_SCALE_CONSTANT": 100,
    "VLLM_ENABLE_V1_MULTIPROCESSING": True,
    "VLLM_LOG_BATCHSIZE_INTERVAL": -1.0,
    "VLLM_DISABLE_COMPILE_CACHE": False,
    "VLLM_SERVER_DEV_MODE": False,
    "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": 128,
    "VLLM_MLA_DISABLE": False,
    "VLLM_MLA_PERFORM_MATRIX_ABSORPTION": True,
    "VLLM_MLA_DISABLE_REQUANTIZATION": False,
    "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON": False,
    "VLLM_RAY_PER_WORKER_GPUS": 1.0,
    "VLLM_RAY_BUNDLE_INDICES": [],
    "VLLM_DP_RANK": 0,
    "VLLM_DP_SIZE": 1,
    "VLLM_DP_MASTER_IP": "",
    "VLLM_DP_MASTER_PORT": 0,
    "VLLM_CI_USE_S3": False,
    "VLLM_CPU_KVCACHE_SPACE": 0,
    "VLLM_CPU_OMP_THREADS_BIND": "all",
    "CUDA_HOME": None,
    "VLLM_NCCL_SO_PATH": None,
    "LD_LIBRARY_PATH": None,
    "VLLM_FLASH_ATTN_VERSION": None,
    "CUDA_VISIBLE_DEVICES": None,
    "VLLM_USE_FLASHINFER_SAMPLER": None,
    "VLLM_FLASHINFER_FORCE_TENSOR_CORES": False,
    "VLLM_TEST_FORCE_FP8_MARLIN": False,
    "VLLM_SKIP_P2P_CHECK": False,
    "VLLM_CUDA_MEM_ALIGN_KV_CACHE": True,
    "VLLM_CUDART_SO_PATH": None,
    "VLLM_USE_TRITON_FLASH_ATTN": True,
    "VLLM_ROCM_FP8_PADDING": True,
    "VLLM_OPENVINO_DEVICE": "CPU",
    "VLLM_OPENVINO_KVCACHE_SPACE": 0,
    "VLLM_OPENVINO_CPU_KV_CACHE_PRECISION": None,
    "VLLM_OPENVINO_ENABLE_QUANTIZED_WEIGHTS": False,
    "VLLM_XLA_CACHE_PATH": f"{HOME}/.cache/kvrun/xla_cache",
    "VLLM_XLA_CHECK_RECOMPILATION": False,
    "VLLM_CONTIGUOUS_PA": True,
}


def _seed_text() -> str:
    if not SEED.is_file():
        pytest.skip(f"vLLM's variable list is not at {SEED} (it lives beside the repo)")
    return SEED.read_text(encoding="utf-8")


def _seed_names() -> set[str]:
    """Every name vLLM's list reads: getenv("X"), environ.get("X"), environ["X"], "X" in os.environ."""
    text = _seed_text()
    call = r"""(?:getenv|environ\.get|environ\[)\(?\s*['"]([A-Z][A-Z0-9_]*)['"]"""
    member = r"""['"]([A-Z][A-Z0-9_]*)['"]\s+(?:not\s+)?in\s+os\.environ"""
    return {a or b for a, b in re.findall(f"{call}|{member}", text)}


def test_every_seed_variable_is_registered() -> None:
    names = _seed_names()
    registered = {v.name for v in envs.VARIABLES}
    assert len(names) == 90
    assert names - registered == set()
    # Registered beyond the seed: HF_HUB_OFFLINE (not vLLM's; kvrun's loader honours it)
    # and VLLM_XLA_CHECK_RECOMPILATION (vLLM's TPU worker reads it; kvrun-tpu honours it).
    extra = {"HF_HUB_OFFLINE", "VLLM_XLA_CHECK_RECOMPILATION"}
    assert registered == names | BY_MEANING | extra
    assert {"VLLM_PLUGINS", "DO_NOT_TRACK", "MAX_JOBS", "CUDA_HOME", "LOCAL_RANK"} <= names
    # Cross-check with a plain grep: every quoted upper-case word is a variable or a value.
    quoted = set(re.findall(r"""["']([A-Z][A-Z0-9_]*)["']""", _seed_text()))
    assert quoted - registered == SEED_VALUES


def test_registry_entries_are_complete() -> None:
    assert [v.name for v in envs.VARIABLES] == list(DEFAULTS)
    for var in envs.VARIABLES:
        assert var.group in envs.GROUPS, var.name
        assert var.type in {"bool", "int", "float", "str", "path", "list[str]", "list[int]"}
        assert var.doc and "\n" not in var.doc, var.name
        assert var.accepted, var.name


def test_every_default_from_an_empty_environment() -> None:
    env = envs.read_env({"HOME": HOME})
    assert {v.name: getattr(env, v.name) for v in envs.VARIABLES} == DEFAULTS
    for var, value, source in env.items():
        assert source == "default", var.name
        assert env.raw(var.name) is None
        assert env.default(var.name) == value
    # bool is a subclass of int: check the types too, not just ==
    assert type(env.VLLM_USE_V1) is bool and type(env.VLLM_RPC_TIMEOUT) is int


def test_defaults_are_not_shared_between_snapshots() -> None:
    first = envs.read_env({})
    first.VLLM_DISABLED_KERNELS.append("MarlinLinearKernel")
    assert envs.read_env({}).VLLM_DISABLED_KERNELS == []


BOOL_SPELLINGS = [
    ("1", True), ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("Yes", True),
    ("on", True), ("ON", True), (" 1 ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("NO", False),
    ("off", False), ("Off", False),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BOOL_SPELLINGS)
def test_boolean_spellings(text: str, expected: bool) -> None:
    for name in ("VLLM_USE_MODELSCOPE", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "VLLM_CONTIGUOUS_PA"):
        env = envs.read_env({name: text})
        assert getattr(env, name) is expected
        assert env.source(name) == "environment"
        assert env.raw(name) == text


def test_vllm_misreadings_read_as_meant() -> None:
    # vLLM reads the first as false and the other two as true.
    env = envs.read_env(
        {
            "VLLM_USE_MODELSCOPE": "1",
            "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "0",
            "VLLM_USE_PRECOMPILED": "0",
        }
    )
    assert env.VLLM_USE_MODELSCOPE is True
    assert env.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH is False
    assert env.VLLM_USE_PRECOMPILED is False


# (variable, value, the message's reason and what is accepted)
BAD_VALUES = [
    ("VLLM_USE_MODELSCOPE", "maybe", f"(not a boolean); {BOOL_ACCEPTED}"),
    ("VLLM_TRACE_FUNCTION", "2", f"(not a boolean); {BOOL_ACCEPTED}"),
    ("VLLM_RPC_TIMEOUT", "-5", "(below 1); accepted: an integer >= 1 (milliseconds)"),
    ("VLLM_RPC_TIMEOUT", "1.5", "(not an integer); accepted: an integer >= 1 (milliseconds)"),
    ("VLLM_ENGINE_ITERATION_TIMEOUT_S", "0", "(below 1); accepted: an integer >= 1 (seconds)"),
    ("LOCAL_RANK", "-1", "(below 0); accepted: an integer >= 0"),
    ("MAX_JOBS", "many", "(not an integer); accepted: an integer >= 1"),
    ("VLLM_PORT", "70000", "(above 65535); accepted: a port number (an integer from 0 to 65535)"),
    ("VLLM_PORT", "-1", "(below 0); accepted: a port number (an integer from 0 to 65535)"),
    ("VLLM_DP_MASTER_PORT", "http", "(not an integer); accepted: an integer from 0 to 65535"),
    ("VLLM_FLASH_ATTN_VERSION", "4", "(above 3); accepted: an integer from 2 to 3"),
    ("VLLM_CPU_KVCACHE_SPACE", "abc", "(not a number); accepted: a number >= 0 (GiB)"),
    ("VLLM_CPU_KVCACHE_SPACE", "-1", "(below 0); accepted: a number >= 0 (GiB)"),
    ("VLLM_CPU_KVCACHE_SPACE", "nan", "(not a finite number); accepted: a number >= 0 (GiB)"),
    ("VLLM_RAY_PER_WORKER_GPUS", "0", "(not above 0); accepted: a number > 0"),
    ("VLLM_LOG_BATCHSIZE_INTERVAL", "soon", "(not a number); accepted: a number (seconds)"),
    (
        "VLLM_RAY_BUNDLE_INDICES",
        "0,x,2",
        "('x' is not an integer); accepted: comma-separated integers, each >= 0, all different",
    ),
    (
        "VLLM_RAY_BUNDLE_INDICES",
        "0,1,1",
        "(1 repeated); accepted: comma-separated integers, each >= 0, all different",
    ),
    (
        "VLLM_PP_LAYER_PARTITION",
        "12,0",
        "(0 is below 1); accepted: comma-separated integers, each >= 1",
    ),
    (
        "VLLM_PP_LAYER_PARTITION",
        "12;12",
        "('12;12' is not an integer); accepted: comma-separated integers, each >= 1",
    ),
    (
        "VLLM_LOGGING_LEVEL",
        "LOUD",
        "(not one of the accepted values); accepted: one of CRITICAL, ERROR, WARNING, INFO, DEBUG",
    ),
    (
        "VLLM_WORKER_MULTIPROC_METHOD",
        "thread",
        "(not one of the accepted values); accepted: one of fork, spawn",
    ),
    (
        "CMAKE_BUILD_TYPE",
        "release",
        "(not one of the accepted values); accepted: one of Debug, Release, RelWithDebInfo",
    ),
    (
        "VLLM_OPENVINO_DEVICE",
        "NPU",
        "(not one of the accepted values); accepted: one of CPU, GPU",
    ),
    (
        "VLLM_CPU_OMP_THREADS_BIND",
        "0-31;33",
        "(not 'all' or a list of CPU ids); accepted: 'all', or CPU ids and ranges such as "
        "0-31,33 with ranks separated by '|' (0-15|16-31)",
    ),
    (
        "VLLM_USAGE_STATS_SERVER",
        "stats.example.com",
        "(not an http(s) URL); accepted: an http:// or https:// URL",
    ),
    (
        "VLLM_TARGET_DEVICE",
        "my device",
        "(not a platform name); accepted: the name of an installed platform plugin "
        "(lower-case letters, digits, _)",
    ),
]


@pytest.mark.parametrize(("name", "value", "tail"), BAD_VALUES)
def test_bad_values_name_variable_value_and_accepted(name: str, value: str, tail: str) -> None:
    with pytest.raises(ConfigError) as info:
        envs.read_env({name: value})
    assert str(info.value) == f"{name}={value!r} is invalid {tail}"


def test_logging_config_path_missing_or_not_json(tmp_path: Path) -> None:
    accepted = "accepted: the path of an existing JSON file holding a logging dictConfig object"
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError) as info:
        envs.read_env({"VLLM_LOGGING_CONFIG_PATH": str(missing)})
    assert (
        str(info.value)
        == f"VLLM_LOGGING_CONFIG_PATH={str(missing)!r} is invalid (no such file); {accepted}"
    )

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        envs.read_env({"VLLM_LOGGING_CONFIG_PATH": str(broken)})
    assert str(info.value) == (
        f"VLLM_LOGGING_CONFIG_PATH={str(broken)!r} is invalid (not valid JSON: Expecting "
        f"property name enclosed in double quotes: line 1 column 2 (char 1)); {accepted}"
    )

    listing = tmp_path / "list.json"
    listing.write_text("[1]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        envs.read_env({"VLLM_LOGGING_CONFIG_PATH": str(listing)})
    assert str(info.value) == (
        f"VLLM_LOGGING_CONFIG_PATH={str(listing)!r} is invalid (the JSON is not an object); "
        f"{accepted}"
    )

    good = tmp_path / "good.json"
    good.write_text('{"version": 1}', encoding="utf-8")
    read = envs.read_env({"VLLM_LOGGING_CONFIG_PATH": str(good)})
    assert read.raw("VLLM_LOGGING_CONFIG_PATH") == read.VLLM_LOGGING_CONFIG_PATH
    assert read.source("VLLM_LOGGING_CONFIG_PATH") == "environment"


def test_kubernetes_vllm_port_is_explained() -> None:
    with pytest.raises(ConfigError) as info:
        envs.read_env({"VLLM_PORT": "tcp://10.0.0.1:8000"})
    assert str(info.value) == (
        "VLLM_PORT='tcp://10.0.0.1:8000' is not a port number: it is the address Kubernetes "
        "injects as VLLM_PORT for a Service named `vllm`; rename the Service, or set "
        "VLLM_PORT to a port number (an integer from 0 to 65535)"
    )


def test_typed_values() -> None:
    env = envs.read_env(
        {
            "HOME": HOME,
            "VLLM_PORT": "8000",
            "VLLM_CPU_KVCACHE_SPACE": "2.5",
            "VLLM_OPENVINO_KVCACHE_SPACE": "8",
            "VLLM_RAY_BUNDLE_INDICES": "3, 1,2",
            "VLLM_PP_LAYER_PARTITION": "12,12,8",
            "VLLM_DISABLED_KERNELS": "MarlinLinearKernel, ExllamaLinearKernel,",
            "VLLM_LOGGING_LEVEL": "debug",
            "VLLM_OPENVINO_DEVICE": "gpu",
            "VLLM_TARGET_DEVICE": " CPU ",
            "VLLM_TORCH_PROFILER_DIR": "~/traces",
            "VLLM_CPU_OMP_THREADS_BIND": "0-15|16-31,33",
            "MAX_JOBS": "4",
        }
    )
    assert env.VLLM_PORT == 8000
    assert env.VLLM_CPU_KVCACHE_SPACE == 2.5
    assert env.VLLM_OPENVINO_KVCACHE_SPACE == 8
    assert env.VLLM_RAY_BUNDLE_INDICES == [3, 1, 2]
    assert env.VLLM_PP_LAYER_PARTITION == [12, 12, 8]
    assert env.VLLM_DISABLED_KERNELS == ["MarlinLinearKernel", "ExllamaLinearKernel"]
    assert env.VLLM_LOGGING_LEVEL == "DEBUG"
    assert env.VLLM_OPENVINO_DEVICE == "GPU"
    assert env.VLLM_TARGET_DEVICE == "cpu"
    profiler_dir = env.VLLM_TORCH_PROFILER_DIR  # a local: ruff's SIM300 misreads NAMES
    assert profiler_dir == f"{HOME}/traces"
    assert env.VLLM_CPU_OMP_THREADS_BIND == "0-15|16-31,33"
    assert env.MAX_JOBS == 4
    # an integer amount of GiB stays an int, so it prints as written
    assert type(envs.read_env({"VLLM_CPU_KVCACHE_SPACE": "40"}).VLLM_CPU_KVCACHE_SPACE) is int


def test_torch_profiler_dir_is_made_absolute() -> None:
    env = envs.read_env({"VLLM_TORCH_PROFILER_DIR": "prof"})
    profiler_dir = env.VLLM_TORCH_PROFILER_DIR
    assert profiler_dir == os.path.join(os.getcwd(), "prof")


def test_plugins_unset_empty_and_list() -> None:
    assert envs.read_env({}).VLLM_PLUGINS is None
    empty = envs.read_env({"VLLM_PLUGINS": ""})
    assert empty.VLLM_PLUGINS == []
    assert empty.source("VLLM_PLUGINS") == "environment"
    assert envs.read_env({"VLLM_PLUGINS": " cpu , lora ,"}).VLLM_PLUGINS == ["cpu", "lora"]


def test_empty_value_means_unset_for_non_text() -> None:
    env = envs.read_env({"VLLM_PORT": "", "VLLM_RPC_TIMEOUT": " ", "VLLM_HOST_IP": ""})
    assert env.VLLM_PORT is None
    assert env.VLLM_RPC_TIMEOUT == 10000
    assert env.source("VLLM_PORT") == "default"
    assert env.raw("VLLM_PORT") == ""
    assert env.source("VLLM_HOST_IP") == "environment"  # "" is a value for text


def test_xdg_directories() -> None:
    env = envs.read_env(
        {"HOME": HOME, "XDG_CONFIG_HOME": "/xdg/config", "XDG_CACHE_HOME": "/xdg/cache"}
    )
    assert env.VLLM_CONFIG_ROOT == "/xdg/config/kvrun"
    assert env.VLLM_CACHE_ROOT == "/xdg/cache/kvrun"
    assert env.VLLM_ASSETS_CACHE == "/xdg/cache/kvrun/assets"
    assert env.VLLM_XLA_CACHE_PATH == "/xdg/cache/kvrun/xla_cache"
    assert env.source("VLLM_CACHE_ROOT") == "default"

    moved = envs.read_env({"HOME": HOME, "VLLM_CACHE_ROOT": "~/c", "VLLM_CONFIG_ROOT": "/cfg"})
    got = [moved.VLLM_CACHE_ROOT, moved.VLLM_ASSETS_CACHE, moved.VLLM_XLA_CACHE_PATH]
    assert got == [f"{HOME}/c", f"{HOME}/c/assets", f"{HOME}/c/xla_cache"]
    assert moved.VLLM_CONFIG_ROOT == "/cfg"
    assert moved.default("VLLM_CACHE_ROOT") == f"{HOME}/.cache/kvrun"


def test_do_not_track_follows_the_generic_variable() -> None:
    env = envs.read_env({"DO_NOT_TRACK": "true"})
    assert env.DO_NOT_TRACK is True
    assert env.VLLM_DO_NOT_TRACK is True
    assert env.source("VLLM_DO_NOT_TRACK") == "default"
    own = envs.read_env({"DO_NOT_TRACK": "1", "VLLM_DO_NOT_TRACK": "0"})
    assert own.VLLM_DO_NOT_TRACK is False


def test_secrets_stay_out_of_repr() -> None:
    env = envs.read_env({"VLLM_API_KEY": "sk-secret", "S3_SECRET_ACCESS_KEY": "s3-secret"})
    assert env.VLLM_API_KEY == "sk-secret"
    assert "sk-secret" not in repr(env) and "s3-secret" not in repr(env)
    assert "VLLM_RPC_TIMEOUT=10000" in repr(env)
    secret = {v.name for v in envs.VARIABLES if v.secret}
    assert secret == {"VLLM_API_KEY", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}


def test_snapshot_is_frozen_and_names_are_checked() -> None:
    env = envs.read_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.VLLM_PORT = 1  # type: ignore[misc]
    with pytest.raises(KeyError, match="VLLM_PROT is not a registered variable"):
        env.source("VLLM_PROT")


def test_unknown_variables_with_closest_names() -> None:
    environ = {
        "VLLM_LOGING_LEVEL": "DEBUG",
        "VLLM_FOO": "1",
        "VLLM_SERVICE_HOST": "10.0.0.1",
        "VLLM_PORT_8000_TCP": "tcp://10.0.0.1:8000",
        "VLLM_PORT": "8000",
        "PATH": "/bin",
    }
    assert envs.unknown_variables(environ) == [
        ("VLLM_FOO", None),
        ("VLLM_LOGING_LEVEL", "VLLM_LOGGING_LEVEL"),
        ("VLLM_PORT_8000_TCP", None),
        ("VLLM_SERVICE_HOST", None),
    ]


def test_unknown_variable_warnings(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"VLLM_LOGING_LEVEL": "DEBUG", "VLLM_FOO": "1", "VLLM_SERVICE_HOST": "x"}
    with caplog.at_level(logging.WARNING, logger="kvrun.envs"):
        envs.warn_unknown_variables(environ)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            "kvrun.envs",
            logging.WARNING,
            "unknown variable VLLM_FOO; `kvrun env` lists the known ones",
        ),
        (
            "kvrun.envs",
            logging.WARNING,
            "unknown variable VLLM_LOGING_LEVEL; did you mean VLLM_LOGGING_LEVEL?",
        ),
        (
            "kvrun.envs",
            logging.WARNING,
            "unknown variable VLLM_SERVICE_HOST; Kubernetes sets it for a Service named "
            "`vllm`, which also overrides VLLM_PORT: rename the Service",
        ),
    ]


def test_importing_kvrun_reads_no_variable() -> None:
    # A bad VLLM_PORT would fail any read; importing must not read.
    code = (
        "import sys, kvrun, kvrun.envs, kvrun.logging_config, kvrun.usage, kvrun.cli.env_cmd; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    environ = {**os.environ, "VLLM_PORT": "tcp://10.0.0.1:8000", "VLLM_RPC_TIMEOUT": "-5"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")


def test_docs_table_is_in_sync() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin = "<!-- BEGIN GENERATED: kvrun env --markdown -->\n\n"
    end = "<!-- END GENERATED -->"
    generated = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert generated == markdown_table(), "regenerate with `kvrun env --markdown`"
    for var in envs.VARIABLES:
        assert f"| `{var.name}` |" in generated


def test_process_defaults_fill_only_what_the_user_left_unset() -> None:
    environ = {"PATH": "/bin"}
    assert envs.apply_process_defaults(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert envs.apply_process_defaults(mine) == {}
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_kvrun_command_applies_them_before_torch_loads() -> None:
    code = (
        "import os, sys; from kvrun.cli.main import main; main(['env']); "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines()[-1] == "PASSIVE False"
