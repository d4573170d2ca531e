"""The conformance kit as a pytest plugin.

Run it as ``pytest -p kvrun.testing.conformance --kvrun-platform=NAME``, or, for a
simulator or a CPU build of a device whose probe rightly declines this machine, as
``--kvrun-platform-class=pkg.mod:Class`` (the class is built without the probe's
verdict; ``--kvrun-num-kv-blocks=N`` sizes the cache where the simulator reports no
device memory).

Opt-in on purpose, not a ``pytest11`` entry point: an auto-loaded plugin would add
its option to every pytest run of every project that has kvrun installed, and a kit
that collects tests must never appear in someone else's run by accident. Loaded
without either platform option it only adds the options. With one, the kit's test
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
    group.addoption(
        "--kvrun-platform-class",
        dest="kvrun_platform_class",
        default=None,
        metavar="PKG.MOD:CLASS",
        help="run the kit on this Platform subclass, built without its probe's verdict "
        "(a simulator or CPU build of your device); the probe is still checked",
    )
    group.addoption(
        "--kvrun-num-kv-blocks",
        dest="kvrun_num_kv_blocks",
        default=None,
        type=int,
        metavar="N",
        help="KV blocks for the kit's greedy-parity run (default: the platform's budget)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("kvrun_platform", None) or config.getoption("kvrun_platform_class", None):
        config.args.append(str(KIT_MODULE))
