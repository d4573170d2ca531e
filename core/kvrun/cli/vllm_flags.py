"""vLLM's `serve` flags on `kvrun serve`: each one works, is refused by name, or warns.

The table (:data:`kvrun.cli.vllm_flag_table.FLAGS`) names every flag of `vllm serve`
and what kvrun does without it. The parser decides what is supported: a flag that
kvrun's parser defines is kvrun's own and is never refused here, so the day someone
adds ``--tool-call-parser`` to `kvrun serve`, its refusal stops by itself.
:func:`add_vllm_flags` registers the rest, hidden from ``--help``, with an action that
at parse time

- accepts a value that asks for what kvrun does anyway (``-tp 1``),
- refuses with :class:`kvrun.errors.CommandLineError` naming the flag, why, and what to
  use instead, or
- for pure tuning knobs (no output changes without them) records the flag, so the
  command logs one warning that it has no effect.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kvrun.errors import CommandLineError

__all__ = [
    "NOTED_DEST",
    "Arity",
    "Verdict",
    "VllmFlag",
    "add_vllm_flags",
    "flag_status",
    "markdown_table",
    "no_effect_warnings",
    "normalize_argv",
]

NOTED_DEST = "_vllm_no_effect"  # namespace attribute: [(spelled flag, value)] with no effect


class Arity(Enum):
    """How vLLM's parser reads the flag (what kvrun must consume to stay aligned)."""

    BOOL = "bool"  # --x / --no-x (argparse.BooleanOptionalAction)
    SWITCH = "switch"  # --x alone (store_true)
    VALUE = "value"  # --x VALUE
    VALUES = "values"  # --x V [V ...]
    JSON = "json"  # --x JSON, or --x.key VALUE (vLLM's dotted keys, merged into one JSON)
    OPTIONAL = "optional"  # --x [VALUE]


class Verdict(Enum):
    """What kvrun does when its parser does not define the flag."""

    KVRUN = "kvrun"  # kvrun's parser must define it (a test holds it to that)
    REFUSE = "refuse"  # an error at parse time, before anything loads
    WARN = "warn"  # accepted; one warning in the log that it has no effect


@dataclass(frozen=True)
class VllmFlag:
    names: tuple[str, ...]  # vLLM's long name first, then its short aliases ("-tp")
    group: str  # vLLM's --help group ("ParallelConfig", "Frontend", ...)
    arity: Arity
    verdict: Verdict
    reason: str  # KVRUN: how kvrun reads it; else why kvrun does not do it
    instead: str = ""  # what to use instead, if anything
    # Values asking for what kvrun does anyway, accepted without a word: "1" for -tp,
    # "false" for a bool flag's --no- form, "true" for its bare form.
    accepts: tuple[str, ...] = ()
    maps_to: str = ""  # kvrun's own flag of the same meaning: registered as an alias of it
    removed: bool = False  # gone from current vLLM; older scripts still carry it

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def option_strings(self) -> tuple[str, ...]:
        """Every spelling vLLM's parser accepts (the --no- twin of a bool flag too)."""
        if self.arity is Arity.BOOL:
            return (*self.names, "--no-" + self.name[2:])
        return self.names

    def accepted(self, value: str) -> bool:
        return any(_same(value, a) for a in self.accepts)


def _same(value: str, accepted: str) -> bool:
    """``value`` and ``accepted`` ask for the same: "1" == "1.0", "FCFS" == "fcfs"."""
    if value.strip().lower() == accepted.lower():
        return True
    try:
        return float(value) == float(accepted)
    except ValueError:
        return False


def flag_status(flag: VllmFlag, parser: argparse.ArgumentParser) -> str:
    """``"supported"`` when kvrun's parser defines every spelling, else the verdict's value.

    Call it after :func:`add_vllm_flags`: the aliases it adds (``maps_to``, a bool
    flag's --no- twin) count as kvrun's; its refusing or warning actions do not.
    """
    defined = _kvrun_options(parser)
    if all(s in defined for s in flag.option_strings):
        return "supported"
    return flag.verdict.value


def _kvrun_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of the parser's own actions (not the compat actions added here)."""
    return {
        s
        for action in parser._actions
        if not isinstance(action, _VllmFlagAction)
        for s in action.option_strings
    }


class _VllmFlagAction(argparse.Action):
    """A vLLM flag kvrun's parser lacks: accept, record as having no effect, or refuse."""

    def __init__(self, option_strings: Sequence[str], dest: str, flag: VllmFlag, **kw: Any):
        super().__init__(option_strings, dest, **kw)
        self.flag = flag

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        spelled = option_string or self.flag.name
        value = _value_text(self.flag, spelled, values)
        if self.flag.accepted(value):
            return
        if self.flag.verdict is Verdict.WARN:
            noted = [*(getattr(namespace, NOTED_DEST, None) or []), (spelled, value)]
            setattr(namespace, NOTED_DEST, noted)
            return
        raise CommandLineError(_refusal(self.flag, spelled, value))


def _value_text(flag: VllmFlag, spelled: str, values: object) -> str:
    if flag.arity in (Arity.BOOL, Arity.SWITCH):
        return "false" if spelled.startswith("--no-") else "true"
    if isinstance(values, str):
        return values
    if isinstance(values, list | tuple):
        return " ".join(str(v) for v in values)
    return ""  # an optional value left out (its const)


def _shown(flag: VllmFlag, spelled: str, value: str) -> str:
    """``-tp 2 (vLLM's --tensor-parallel-size)``: as the user wrote it, then vLLM's name."""
    text = (
        spelled if flag.arity in (Arity.BOOL, Arity.SWITCH) or not value else f"{spelled} {value}"
    )
    return text if spelled.startswith("--") else f"{text} (vLLM's {flag.name})"


def _refusal(flag: VllmFlag, spelled: str, value: str) -> str:
    parts = [f"{_shown(flag, spelled, value)} is not supported: {flag.reason}"]
    if flag.accepts:
        parts.append(f"Accepted: {_accepts_text(flag)}")
    if flag.instead:
        parts.append(f"Instead: {flag.instead}")
    return ". ".join(parts) + "."


def _accepted_spellings(flag: VllmFlag) -> list[str]:
    """The accepted values as a user writes them: ``1``; ``--no-enable-lora``."""
    if flag.arity is Arity.BOOL:
        return [flag.name if a == "true" else "--no-" + flag.name[2:] for a in flag.accepts]
    if flag.arity is Arity.SWITCH:
        return [flag.name] if "true" in flag.accepts else []
    return list(flag.accepts)


def _accepts_text(flag: VllmFlag) -> str:
    return " or ".join(_accepted_spellings(flag)) or "only its absence"


def add_vllm_flags(parser: argparse.ArgumentParser, flags: Sequence[VllmFlag]) -> None:
    """Register what ``parser`` lacks of ``flags``; call it after every kvrun flag is added.

    A flag kvrun's parser defines is left alone. A missing alias of one it defines
    (``--no-trust-remote-code`` for kvrun's store_true ``--trust-remote-code``, or a
    ``maps_to`` name) becomes an alias with the same destination.
    """
    own = {s: a for a in parser._actions for s in a.option_strings}
    for flag in flags:
        missing = [s for s in flag.option_strings if s not in own]
        if not missing:
            continue
        target = own.get(flag.maps_to) or next((own[s] for s in flag.names if s in own), None)
        if target is not None:
            _add_aliases(parser, flag, target, missing)
            continue
        kw: dict[str, Any] = {"nargs": _NARGS[flag.arity]}
        if flag.arity is Arity.OPTIONAL:
            kw["const"] = True
        parser.add_argument(
            *missing,
            action=_VllmFlagAction,
            flag=flag,
            dest="_vllm_" + flag.name.lstrip("-").replace("-", "_"),
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **kw,
        )


_NARGS: dict[Arity, Any] = {
    Arity.BOOL: 0,
    Arity.SWITCH: 0,
    Arity.VALUE: None,
    Arity.VALUES: "+",
    Arity.JSON: None,
    Arity.OPTIONAL: "?",
}


def _add_aliases(
    parser: argparse.ArgumentParser,
    flag: VllmFlag,
    target: argparse.Action,
    missing: list[str],
) -> None:
    """Spellings of a flag kvrun defines under other names, with its destination."""
    common: dict[str, Any] = {"dest": target.dest, "default": argparse.SUPPRESS}
    common["help"] = argparse.SUPPRESS
    if isinstance(target, argparse.BooleanOptionalAction):
        raise AssertionError(f"{flag.name}: cannot alias {missing} to {target.option_strings}")
    negated = [s for s in missing if s.startswith("--no-")]
    plain = [s for s in missing if not s.startswith("--no-")]
    if negated:
        if not isinstance(target, argparse._StoreTrueAction):
            raise AssertionError(f"{flag.name}: cannot add {negated} to {target.option_strings}")
        parser.add_argument(*negated, action="store_false", **common)
    if plain and isinstance(target, argparse._StoreTrueAction | argparse._StoreFalseAction):
        parser.add_argument(*plain, action=type(target), **common)
    elif plain:
        if target.type is not None:
            common["type"] = target.type
        parser.add_argument(
            *plain, action=type(target), nargs=target.nargs, choices=target.choices, **common
        )


def no_effect_warnings(namespace: argparse.Namespace, flags: Sequence[VllmFlag]) -> list[str]:
    """One line per accepted flag with no effect in kvrun, for the command's log."""
    by_spelling = {s: f for f in flags for s in f.option_strings}
    lines = []
    for spelled, value in getattr(namespace, NOTED_DEST, None) or []:
        flag = by_spelling[spelled]
        lines.append(f"{_shown(flag, spelled, value)} has no effect in kvrun: {flag.reason}")
    return lines


_SHORT_VALUE = re.compile(r"^(-[A-Za-z])(\d+)$")  # vLLM's -O3 = -O 3


def normalize_argv(argv: Sequence[str], flags: Sequence[VllmFlag]) -> list[str]:
    """vLLM's spellings as kvrun's parser reads them, as vLLM's own parser does.

    ``--max_model_len`` is ``--max-model-len``; ``-O3`` is ``-O 3``; ``-O.mode 3`` is
    ``--compilation-config.mode 3``; ``--x.key VALUE`` pairs of a JSON flag become one
    ``--x JSON`` at the place of the first. Everything after ``--`` is left alone.
    """
    json_flags = {s for f in flags if f.arity is Arity.JSON for s in f.names}
    out: list[str] = []
    merged: dict[str, dict[str, Any]] = {}  # JSON flag -> keys given with dots
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            out += tokens[i - 1 :]
            break
        if token.startswith("-O."):
            token = "--compilation-config." + token[3:]
        match = _SHORT_VALUE.match(token)
        if match:
            out += [match.group(1), match.group(2)]
            continue
        if not token.startswith("--"):
            out.append(token)
            continue
        key, eq, value = token.partition("=")
        key = key.replace("_", "-")
        base, dot, path = key.partition(".")
        if dot and base in json_flags:
            if not eq:
                if i >= len(tokens):
                    raise CommandLineError(f"{token} needs a value")
                value = tokens[i]
                i += 1
            if base not in merged:
                merged[base] = {}
                out += [base, ""]  # the JSON is filled in below, at the first key's place
            _set_path(merged[base], path.replace("-", "_"), value, token)
            continue
        out.append(key + eq + value)
    for base, keys in merged.items():
        out[out.index(base) + 1] = json.dumps(keys)
    return out


def _set_path(target: dict[str, Any], path: str, value: str, token: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise CommandLineError(f"{token}: {part!r} is given both as a value and as keys")
        target = child
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if last.endswith("+"):  # vLLM's list append: --x.key+ VALUE
        target.setdefault(last[:-1], []).append(parsed)
    else:
        target[last] = parsed


def markdown_table(flags: Sequence[VllmFlag], parser: argparse.ArgumentParser) -> str:
    """The table of docs/serving.md: every vLLM flag and what `kvrun serve` does with it."""
    lines = [
        "| vLLM flag | group | in kvrun | notes; why not, and what to use instead |",
        "|---|---|---|---|",
    ]
    helps = {s: a.help for a in parser._actions for s in a.option_strings}
    for flag in flags:
        status = flag_status(flag, parser)
        spellings = ", ".join(f"`{s}`" for s in flag.option_strings)
        group = flag.group + (" (older vLLM)" if flag.removed else "")
        why_from_help = status == "supported" and flag.verdict is not Verdict.KVRUN
        if why_from_help:
            # kvrun gained it since the table was written: its own help says what it does
            why = _cell(str(helps.get(flag.name) or "kvrun's own flag").replace("%%", "%"))
        else:
            why = _cell(flag.reason + (f"; instead: {flag.instead}" if flag.instead else ""))
        shown = "kvrun's flag" if why_from_help else _status_text(flag, status)
        lines.append(f"| {spellings} | {group} | {shown} | {why} |")
    return "\n".join(lines) + "\n"


def _status_text(flag: VllmFlag, status: str) -> str:
    if status == "supported":
        return f"supported, as `{flag.maps_to}`" if flag.maps_to else "supported"
    word = {"refuse": "refused", "warn": "no effect (a warning)", "kvrun": "MISSING"}[status]
    accepted = " or ".join(f"`{a}`" for a in _accepted_spellings(flag))
    return f"{accepted} accepted; otherwise {word}" if accepted else word


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")
