"""The conformance kit as a pytest plugin.

Run it as ``pytest -p kvrun.testing.conformance --kvrun-platform=NAME``.

Opt-in on purpose, not a ``pytest11`` entry point: an auto-loaded plugin would add
its option to every pytest run of every project that has kvrun installed, and a kit
that collects tests must never appear in someone else's run by accident. Loaded
without ``--kvrun-platform`` it only adds the option. With it, the kit's test
module is appended to the paths pytest collects, next to whatever the command line
named. A vendor can instead subclass :class:`kvrun.testing.suite.ConformanceSuite`
in a test module of their own (``class TestAcme(ConformanceSuite): kvrun_platform =
"acme"``), which needs no plugin at all. This module imports neither torch nor the
kit, so loading it costs nothing when the option is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["KIT_MODULE", "pytest_addoption", "pytest_configure"]

# The module collected for --kvrun-platform: one ConformanceSuite subclass.
KIT_MODULE = Path(__file__).with_name("kit_tests.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvrun", "kvrun conformance kit")
    group.addoption(
        "--kvrun-platform",
        dest="kvrun_platform",
        default=None,
        metavar="NAME",
        help="run the kvrun conformance kit on the platform whose entry point in "
        "kvrun.platform_plugins is NAME",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("kvrun_platform", None):
        config.args.append(str(KIT_MODULE))
