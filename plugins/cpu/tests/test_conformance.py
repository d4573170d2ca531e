"""The cpu platform through the core's conformance kit, as a vendor would run it."""

from __future__ import annotations

from kvrun.testing.suite import ConformanceSuite


class TestCpuConformance(ConformanceSuite):
    kvrun_platform = "cpu"
