"""kvrun-tpu through the core's conformance kit, on XLA's CPU device (PJRT_DEVICE=CPU).

The probe rightly declines a CPU XLA device, so the kit builds the platform from its
class path (the kit's opt-in for simulators and CPU builds of a device) and drives the
XLA executor with the engine's own scheduler and step function. Runs only where
torch_xla is installed (`nox -s tpu`); the default venv skips it with that reason.
"""

from __future__ import annotations

from typing import ClassVar

import pytest

from kvrun.testing.suite import ConformanceSuite

# Before the suite's collection asks the platform for its attention backends, which
# import torch_xla.
pytest.importorskip("torch_xla", reason="torch_xla is not installed; run `nox -s tpu`")

# PJRT's CPU client keeps no allocator statistics, so the platform cannot size a KV
# budget there (a PluginError asking for num_kv_blocks, by design); on a TPU it can.
_NO_MEMORY = (
    "XLA on the CPU reports no device memory: TpuPlatform.kv_cache_budget raises "
    "PluginError and asks for num_kv_blocks"
)


class TestTpuConformance(ConformanceSuite):
    kvrun_platform_class = "kvrun_tpu.platform:TpuPlatform"
    # No budget on XLA-CPU (above): parity runs on a cache of this many blocks.
    kvrun_num_kv_blocks = 64
    kvrun_known_failures: ClassVar[dict[str, str]] = {
        "test_kv_plan_within_budget[*]": _NO_MEMORY,
        "test_kv_refuses_budget_below_one_sequence[*]": _NO_MEMORY,
    }
