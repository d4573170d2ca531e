"""Collected by ``-p kvrun.testing.conformance --kvrun-platform=NAME``: the whole kit once."""

from __future__ import annotations

from kvrun.testing.suite import ConformanceSuite

__all__ = ["TestKvrunConformance"]


class TestKvrunConformance(ConformanceSuite):
    """The platform is the --kvrun-platform option."""
