"""Logging set-up from the VLLM_* logging variables; entry points call it once.

Only the "kvrun" logger is configured (a stderr handler, a level, a prefix), never the
root logger: an application that embeds kvrun keeps its own logging. A JSON file in
VLLM_LOGGING_CONFIG_PATH replaces that default and may configure anything.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import IO, Any, TextIO

from kvrun.envs import LOGGING_LEVELS, EnvSnapshot
from kvrun.errors import ConfigError

__all__ = ["configure_logging", "stop_tracing", "warn_deprecated"]

_ROOT = "kvrun"
_FORMAT = "%(levelname)s %(asctime)s [%(name)s:%(lineno)d] %(message)s"
_DATEFMT = "%m-%d %H:%M:%S"
_logger = logging.getLogger("kvrun.logging")
# sys.settrace's callback: (frame, event, arg) -> the frame's local trace function
_TraceFn = Callable[[FrameType, str, Any], Any]


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time, so redirection (and pytest's
    capture) after configuration still sees kvrun's messages."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler.__init__ assigns it; the property always answers sys.stderr


def configure_logging(env: EnvSnapshot) -> None:
    """Apply VLLM_CONFIGURE_LOGGING, VLLM_LOGGING_CONFIG_PATH, VLLM_LOGGING_LEVEL,
    VLLM_LOGGING_PREFIX and VLLM_TRACE_FUNCTION. Calling it again replaces, never
    duplicates, what an earlier call set up."""
    if not env.VLLM_CONFIGURE_LOGGING:
        if env.VLLM_LOGGING_CONFIG_PATH is not None:
            raise ConfigError(
                f"VLLM_LOGGING_CONFIG_PATH={env.VLLM_LOGGING_CONFIG_PATH!r} is set but "
                "VLLM_CONFIGURE_LOGGING=0 tells kvrun not to configure logging; "
                "unset one of them"
            )
    elif env.VLLM_LOGGING_CONFIG_PATH is not None:
        _apply_file(env.VLLM_LOGGING_CONFIG_PATH)
    else:
        _apply_default(env.VLLM_LOGGING_LEVEL, env.VLLM_LOGGING_PREFIX)
    if env.VLLM_TRACE_FUNCTION:
        _start_tracing(env.VLLM_CACHE_ROOT)


def _apply_file(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("the JSON is not an object")
        logging.config.dictConfig(config)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        # dictConfig reports a bad config as ValueError and friends; the user wants
        # the file named, not a traceback from inside the logging package.
        raise ConfigError(
            f"VLLM_LOGGING_CONFIG_PATH={path!r} is not a usable logging configuration "
            f"({exc}); accepted: a JSON file holding a logging.config.dictConfig object"
        ) from None


def _apply_default(level: str, prefix: str) -> None:
    if level not in LOGGING_LEVELS:
        raise ConfigError(
            f"VLLM_LOGGING_LEVEL={level!r} is not a logging level; "
            f"accepted: {', '.join(LOGGING_LEVELS)} (in any case)"
        )
    logger = logging.getLogger(_ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    # The prefix goes into the format, so it leads every record of the hierarchy.
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + _FORMAT, _DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(level)
    # Our handler already prints kvrun's records; passing them on to the root logger
    # would print them twice in an application that configured its own.
    logger.propagate = False


def warn_deprecated(message: str, env: EnvSnapshot) -> None:
    """Log a deprecation warning unless VLLM_NO_DEPRECATION_WARNING is set."""
    if not env.VLLM_NO_DEPRECATION_WARNING:
        logging.getLogger("kvrun.deprecation").warning("deprecated: %s", message)


class _CallTracer:
    """A sys.settrace function writing one line per call into, and return from, kvrun code."""

    def __init__(self, out: IO[str], package_dir: str) -> None:
        self._out = out
        self._package_dir = package_dir + os.sep
        self._lock = threading.Lock()  # the tracer runs in every thread
        self.path = out.name

    def __call__(self, frame: FrameType, event: str, arg: object) -> _TraceFn | None:
        if event != "call" or not frame.f_code.co_filename.startswith(self._package_dir):
            return None  # other code is not traced at all, so it runs at full speed
        frame.f_trace_lines = False  # calls and returns only; line events would flood
        self._write("call", frame)
        return self._local

    def _local(self, frame: FrameType, event: str, arg: object) -> _TraceFn | None:
        if event == "return":
            self._write("return", frame)
        return None

    def _write(self, event: str, frame: FrameType) -> None:
        code = frame.f_code
        where = os.path.relpath(code.co_filename, os.path.dirname(self._package_dir[:-1]))
        line = (
            f"{datetime.datetime.now().isoformat(timespec='microseconds')} "
            f"{threading.get_ident()} {event} {code.co_name} {where}:{frame.f_lineno}\n"
        )
        with self._lock:
            if not self._out.closed:
                self._out.write(line)

    def close(self) -> None:
        with self._lock:
            self._out.close()


def _start_tracing(cache_root: str) -> None:
    if isinstance(sys.gettrace(), _CallTracer):
        return  # already tracing: configure_logging is idempotent
    import kvrun

    trace_dir = os.path.join(cache_root, "traces")
    os.makedirs(trace_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(trace_dir, f"trace-pid{os.getpid()}-{stamp}.log")
    # Line-buffered: a trace is read after a crash or a hang, when nothing else flushes.
    out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by stop_tracing)
    tracer = _CallTracer(out, os.path.dirname(os.path.abspath(kvrun.__file__)))
    sys.settrace(tracer)
    threading.settrace(tracer)
    _logger.info("VLLM_TRACE_FUNCTION is set: tracing kvrun function calls to %s", path)


def stop_tracing() -> str | None:
    """Stop a VLLM_TRACE_FUNCTION trace and close its file; returns the file's path."""
    tracer = sys.gettrace()
    if not isinstance(tracer, _CallTracer):
        return None
    sys.settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
    tracer.close()
    return tracer.path
