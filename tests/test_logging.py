"""configure_logging and warn_deprecated, on the real logging module."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrun import envs
from kvrun.errors import ConfigError
from kvrun.logging_config import configure_logging, stop_tracing, warn_deprecated

LINE = re.compile(r"INFO \d\d-\d\d \d\d:\d\d:\d\d \[kvrun\.test:\d+\] hello\n")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put every logger back as it was: configure_logging changes process-wide state."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger()] + [
        lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = {
        lg.name: (lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers
    }
    # As in a fresh process, where no engine has configured kvrun's logger yet: pytest
    # attaches its capture handlers to every non-propagating logger for each test phase.
    logging.getLogger("kvrun").propagate = True
    yield
    for lg in [logging.getLogger()] + [
        lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]:
        _, level, handlers, propagate, disabled = saved.get(lg.name, (lg, 0, [], True, False))
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
        lg.disabled = disabled


def _env(**values: str) -> envs.EnvSnapshot:
    return envs.read_env(values)


def test_default_configures_only_the_kvrun_logger(capsys: pytest.CaptureFixture[str]) -> None:
    root_handlers = list(logging.getLogger().handlers)
    configure_logging(_env())
    logger = logging.getLogger("kvrun")
    assert (len(logger.handlers), logger.level, logger.propagate) == (1, logging.INFO, False)
    assert logging.getLogger().handlers == root_handlers
    logging.getLogger("kvrun.test").info("hello")
    logging.getLogger("kvrun.test").debug("not shown")
    logging.getLogger("other").warning("not ours")
    err = capsys.readouterr().err
    assert LINE.fullmatch(err), err


def test_twice_is_the_same_as_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(_env())
    configure_logging(_env())
    assert len(logging.getLogger("kvrun").handlers) == 1
    logging.getLogger("kvrun.test").info("hello")
    assert LINE.fullmatch(capsys.readouterr().err)


def test_level_and_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(_env(VLLM_LOGGING_LEVEL="warning", VLLM_LOGGING_PREFIX="[node 100%] "))
    logging.getLogger("kvrun.test").info("quiet")
    logging.getLogger("kvrun.test").warning("loud")
    logging.getLogger("kvrun").error("top")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [["[node", "100%]"]] * 2
    assert [line.removeprefix("[node 100%] ").split(" ")[0] for line in lines] == [
        "WARNING",
        "ERROR",
    ]
    assert lines[0].endswith("] loud") and lines[1].endswith("] top")


def test_bad_level_lists_the_valid_ones() -> None:
    env = dataclasses.replace(_env(), VLLM_LOGGING_LEVEL="LOUD")
    with pytest.raises(ConfigError) as info:
        configure_logging(env)
    assert str(info.value) == (
        "VLLM_LOGGING_LEVEL='LOUD' is not a logging level; "
        "accepted: CRITICAL, ERROR, WARNING, INFO, DEBUG (in any case)"
    )


def test_configure_logging_0_leaves_logging_alone(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("kvrun")
    before = (list(logger.handlers), logger.level, logger.propagate)
    configure_logging(_env(VLLM_CONFIGURE_LOGGING="0", VLLM_LOGGING_PREFIX="P "))
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_configure_logging_0_with_a_config_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "log.json"
    config.write_text('{"version": 1}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        configure_logging(_env(VLLM_CONFIGURE_LOGGING="off", VLLM_LOGGING_CONFIG_PATH=str(config)))
    assert str(info.value) == (
        f"VLLM_LOGGING_CONFIG_PATH={str(config)!r} is set but VLLM_CONFIGURE_LOGGING=0 "
        "tells kvrun not to configure logging; unset one of them"
    )


def test_config_file_is_applied(tmp_path: Path) -> None:
    out = tmp_path / "kvrun.log"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(name)s|%(levelname)s|%(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(out), "formatter": "plain"}
        },
        "loggers": {"kvrun": {"handlers": ["file"], "level": "DEBUG", "propagate": False}},
    }
    path = tmp_path / "log.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    configure_logging(_env(VLLM_LOGGING_CONFIG_PATH=str(path), VLLM_LOGGING_PREFIX="unused "))
    logging.getLogger("kvrun.test").debug("to the file")
    for handler in logging.getLogger("kvrun").handlers:
        handler.flush()
    assert out.read_text(encoding="utf-8") == "kvrun.test|DEBUG|to the file\n"


def test_unusable_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "log.json"
    path.write_text('{"version": 2}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        configure_logging(_env(VLLM_LOGGING_CONFIG_PATH=str(path)))
    assert str(info.value) == (
        f"VLLM_LOGGING_CONFIG_PATH={str(path)!r} is not a usable logging configuration "
        "(Unsupported version: 2); accepted: a JSON file holding a logging.config.dictConfig "
        "object"
    )


def test_deprecation_warnings_honour_the_switch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvrun.deprecation"):
        warn_deprecated("the old flag; use --new-flag", _env())
        warn_deprecated("silenced", _env(VLLM_NO_DEPRECATION_WARNING="1"))
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("kvrun.deprecation", "deprecated: the old flag; use --new-flag")
    ]


def test_trace_function_writes_kvrun_calls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    previous = sys.gettrace()
    env = _env(VLLM_TRACE_FUNCTION="1", VLLM_CACHE_ROOT=str(tmp_path))
    try:
        configure_logging(env)
        configure_logging(env)  # idempotent: still one trace, one file
        envs.read_env({"VLLM_PORT": "1"})
        path = stop_tracing()
    finally:
        stop_tracing()
        sys.settrace(previous)
    assert path is not None
    assert [p.name for p in (tmp_path / "traces").iterdir()] == [Path(path).name]
    text = Path(path).read_text(encoding="utf-8")
    assert re.search(r" call read_env kvrun/envs\.py:\d+\n", text)
    assert re.search(r" return read_env kvrun/envs\.py:\d+\n", text)
    assert re.search(r" call _port kvrun/env_parsers\.py:\d+\n", text)
    assert "test_logging" not in text  # only kvrun's own code is traced
    err = capsys.readouterr().err
    assert err.count("VLLM_TRACE_FUNCTION is set: tracing kvrun function calls to ") == 1
    assert err.rstrip().endswith(path)
    assert stop_tracing() is None
