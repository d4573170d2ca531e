"""How one VLLM_* value is parsed: a parser per kind, each saying what it accepts.

Kept apart from :mod:`kvrun.envs` (the registry) so each stays one job. Nothing here
reads the environment: a parser gets the value's text and, for ``~`` expansion, the
mapping the snapshot is being read from.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvrun.errors import ConfigError

__all__ = [
    "ABS_PATH",
    "BOOL",
    "CPU_LIST",
    "DEVICE",
    "JSON_FILE",
    "OPT_STR",
    "PATH",
    "PORT",
    "STR",
    "STR_LIST",
    "URL",
    "Parser",
    "choice",
    "home",
    "int_list",
    "integer",
    "number",
]

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Parser(Generic[T]):
    """Turns a variable's text into a typed value.

    ``convert`` raises ValueError with a short reason for a bad value (the caller adds
    the variable, the value and ``accepted``), or a complete ConfigError when the
    message needs to say more than that.
    """

    type_name: str  # shown to users: "bool", "int", "float", "str", "path", "list[int]", ...
    accepted: str  # what is accepted, as the end of an error message
    convert: Callable[[str, Mapping[str, str]], T]  # (text, environ) -> value
    empty_is_unset: bool = True  # "" means "use the default" (False where "" means something)

    def parse(self, name: str, text: str, environ: Mapping[str, str]) -> T:
        try:
            return self.convert(text, environ)
        except ConfigError:
            raise
        except (ValueError, OSError) as exc:
            raise ConfigError(
                f"{name}={text!r} is invalid ({exc}); accepted: {self.accepted}"
            ) from None


def home(environ: Mapping[str, str]) -> str:
    """The home directory as the given mapping sees it, so tests need not touch ours."""
    return environ.get("HOME") or os.path.expanduser("~")


def _expand(text: str, environ: Mapping[str, str]) -> str:
    if text == "~" or text.startswith("~/"):
        return home(environ) + text[1:]
    return text


def _bool(text: str, environ: Mapping[str, str]) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not a boolean")


BOOL: Parser[bool] = Parser("bool", "1/0, true/false, yes/no or on/off, in any case", _bool)


def integer(low: int | None = None, high: int | None = None, unit: str = "") -> Parser[int]:
    """An integer in ``low..high`` (either bound may be open)."""
    if low is not None and high is not None:
        accepted = f"an integer from {low} to {high}"
    elif low is not None:
        accepted = f"an integer >= {low}"
    else:
        accepted = "an integer"
    accepted += f" ({unit})" if unit else ""

    def convert(text: str, environ: Mapping[str, str]) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("not an integer") from None
        if low is not None and value < low:
            raise ValueError(f"below {low}")
        if high is not None and value > high:
            raise ValueError(f"above {high}")
        return value

    return Parser("int", accepted, convert)


def number(low: float | None = None, *, above: bool = False, unit: str = "") -> Parser[float]:
    """A finite number, integer or decimal; ``above`` makes ``low`` exclusive."""
    accepted = "a number" if low is None else f"a number {'>' if above else '>='} {low:g}"
    accepted += f" ({unit})" if unit else ""

    def convert(text: str, environ: Mapping[str, str]) -> float:
        stripped = text.strip()
        try:
            value: float = int(stripped)  # keep "40" an int so it prints as written
        except ValueError:
            try:
                value = float(stripped)
            except ValueError:
                raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise ValueError(f"{'not above' if above else 'below'} {low:g}")
        return value

    return Parser("float", accepted, convert)


STR: Parser[str] = Parser("str", "any text", lambda text, _: text, empty_is_unset=False)
# Optional text where "" is the same as unset (an empty API key guards nothing).
OPT_STR: Parser[str] = Parser("str", "any text", lambda text, _: text)


def choice(options: Sequence[str], *, fold: Callable[[str], str] = str) -> Parser[str]:
    """One of ``options``; ``fold`` normalises case before comparing (and is kept)."""

    def convert(text: str, environ: Mapping[str, str]) -> str:
        value = fold(text.strip())
        if value not in options:
            raise ValueError("not one of the accepted values")
        return value

    return Parser("str", "one of " + ", ".join(options), convert)


def _device(text: str, environ: Mapping[str, str]) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
        raise ValueError("not a platform name")
    return value


DEVICE: Parser[str] = Parser(
    "str", "the name of an installed platform plugin (lower-case letters, digits, _)", _device
)

PATH: Parser[str] = Parser("path", "a file-system path", _expand)


def _abs_path(text: str, environ: Mapping[str, str]) -> str:
    return os.path.abspath(_expand(text, environ))


# Relative paths resolve against the working directory at read time, once.
ABS_PATH: Parser[str] = Parser("path", "a file-system path", _abs_path)


def _json_file(text: str, environ: Mapping[str, str]) -> str:
    path = _expand(text, environ)
    if not os.path.isfile(path):
        raise ValueError("no such file")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError("the JSON is not an object")
    return path


JSON_FILE: Parser[str] = Parser(
    "path", "the path of an existing JSON file holding a logging dictConfig object", _json_file
)


def _url(text: str, environ: Mapping[str, str]) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("not an http(s) URL")
    return text.strip()


URL: Parser[str] = Parser("str", "an http:// or https:// URL", _url)


def _port(text: str, environ: Mapping[str, str]) -> int:
    stripped = text.strip()
    if "://" in stripped:
        raise ConfigError(
            f"VLLM_PORT={text!r} is not a port number: it is the address Kubernetes injects "
            "as VLLM_PORT for a Service named `vllm`; rename the Service, or set VLLM_PORT "
            "to a port number (an integer from 0 to 65535)"
        )
    return integer(0, 65535).convert(stripped, environ)


# Only for VLLM_PORT: the Kubernetes message names it.
PORT: Parser[int] = Parser("int", "a port number (an integer from 0 to 65535)", _port)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# "" is meaningful (VLLM_PLUGINS="" loads no plugin), so it is kept as [].
STR_LIST: Parser[list[str]] = Parser(
    "list[str]", "a comma-separated list of names", lambda text, _: _split(text), False
)


def int_list(low: int, *, distinct: bool = False) -> Parser[list[int]]:
    """Comma-separated integers, each >= ``low``."""
    accepted = f"comma-separated integers, each >= {low}" + (", all different" if distinct else "")

    def convert(text: str, environ: Mapping[str, str]) -> list[int]:
        values = []
        for item in text.split(","):
            try:
                value = int(item.strip())
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not an integer") from None
            if value < low:
                raise ValueError(f"{value} is below {low}")
            values.append(value)
        if distinct and len(set(values)) != len(values):
            repeated = sorted({v for v in values if values.count(v) > 1})
            raise ValueError(f"{', '.join(map(str, repeated))} repeated")
        return values

    return Parser("list[int]", accepted, convert)


# "0-31", "0,1,2", "0-31,33"; ranks separated by "|".
_CPU_RANGES = r"\d+(-\d+)?(,\d+(-\d+)?)*"
_CPU_BIND = re.compile(rf"{_CPU_RANGES}(\|{_CPU_RANGES})*")


def _cpu_list(text: str, environ: Mapping[str, str]) -> str:
    value = text.strip()
    if value != "all" and not _CPU_BIND.fullmatch(value):
        raise ValueError("not 'all' or a list of CPU ids")
    return value


CPU_LIST: Parser[str] = Parser(
    "str",
    "'all', or CPU ids and ranges such as 0-31,33 with ranks separated by '|' (0-15|16-31)",
    _cpu_list,
)
