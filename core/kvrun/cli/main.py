"""`kvrun`: one verb per module, imported only when that verb runs.

Each verb module defines ``add_arguments(parser)`` and ``run(args, env) -> int``, and
may define ``normalize_argv(argv) -> argv`` (other tools' spellings of its flags).
A :class:`kvrun.errors.KvrunError` is a user error: its message is printed alone
(no traceback) and the exit status is 2. A flag no verb knows is one too, named with
the verb (``kvrun serve: unknown flag --foo; see kvrun serve --help``), never
argparse's bare "unrecognized arguments".
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvrun.errors import CommandLineError, KvrunError
from kvrun.version import __version__

__all__ = ["main", "parse_command_line"]

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "env": ("kvrun.cli.env_cmd", "show every VLLM_* variable: value, default, source, doc"),
    "plugins": ("kvrun.cli.plugins_cmd", "list discovered plugins and the selected platform"),
    "generate": ("kvrun.cli.generate_cmd", "generate text from a prompt with a model"),
    "serve": ("kvrun.cli.serve_cmd", "serve a model over an OpenAI-compatible HTTP API"),
    "bench": ("kvrun.cli.bench_cmd", "benchmark a running server"),
}


def _parser(verb: str | None) -> argparse.ArgumentParser:
    """All verbs are listed; only the one being run imports its module (keeps start-up cheap)."""
    parser = argparse.ArgumentParser(prog="kvrun", description="kvrun LLM inference runtime")
    parser.add_argument("--version", action="version", version=f"kvrun {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, (module, help_text) in VERBS.items():
        verb_parser = sub.add_parser(name, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module)
        if name == verb:
            importlib.import_module(module).add_arguments(verb_parser)
    return parser


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """``kvrun VERB ...`` as arguments; a :class:`CommandLineError` names a bad flag."""
    argv = list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(verb)
    if verb is not None and verb in VERBS:
        normalize = getattr(importlib.import_module(VERBS[verb][0]), "normalize_argv", None)
        if normalize is not None:
            argv = normalize(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        flag = next((a for a in extras if a.startswith("-")), None)
        if flag is not None:
            raise CommandLineError(f"unknown flag {flag.split('=')[0]}; see kvrun {verb} --help")
        raise CommandLineError(f"unexpected argument {extras[0]!r}; see kvrun {verb} --help")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from kvrun import envs

    defaults = envs.apply_process_defaults()  # before any verb module imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_command_line(argv)
    except CommandLineError as exc:
        verb = next((a for a in argv if not a.startswith("-")), None)
        print(f"kvrun {verb}: {exc}", file=sys.stderr)
        return 2
    try:
        env = envs.read_env()
        from kvrun.logging_config import configure_logging

        configure_logging(env)
        envs.warn_unknown_variables()
        for name, value in defaults.items():
            logging.getLogger("kvrun.envs").debug("%s=%s (kvrun's default)", name, value)
        status: int = importlib.import_module(args._module).run(args, env)
    except KvrunError as exc:
        print(f"kvrun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
