"""kvrun-openvino through the core's conformance kit, as a vendor would run it.

OpenVINO runs the whole model in its compiled paged graph, so the kit skips the
per-kernel checks, holds the executor's own KV plan to the budget and block-size
invariants, and checks greedy parity end to end. The tiny model's IR is exported once
into the test cache (as the other openvino tests do) and reused by later runs.

Below the suite, the kit's newer paths are tested on this real backend: a class-path
target (directly and through the kit's command line), the engine-free parity loop
against the engine, and an executor that allocates fewer blocks than it reports, which
the kit must catch.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kvrun.config import EngineConfig
from kvrun.platforms import KVCachePlan
from kvrun.testing import executor_checks, parity
from kvrun.testing.suite import ConformanceSuite
from kvrun.testing.target import KitTarget, import_platform_class, load_target
from tests.support.checkpoints import cache_root

pytest.importorskip("openvino")

from kvrun_openvino.executor import OpenvinoExecutor
from kvrun_openvino.platform import OpenvinoPlatform

CACHE_ROOT = str(cache_root() / "openvino-cache")
CLASS_PATH = "kvrun_openvino.platform:OpenvinoPlatform"


class TestOpenvinoConformance(ConformanceSuite):
    kvrun_platform = "openvino"
    # The kit's model and its exported IR live beside the other openvino tests' caches.
    kvrun_env: ClassVar[dict[str, Any]] = {"VLLM_CACHE_ROOT": CACHE_ROOT}


@pytest.fixture(scope="module")
def by_class() -> KitTarget:
    return load_target(None, CLASS_PATH, (("VLLM_CACHE_ROOT", CACHE_ROOT),))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return parity.cached_tiny_llama(Path(CACHE_ROOT) / "kvrun_testing")


def test_a_class_path_target_is_built_without_the_probe_s_verdict(by_class: KitTarget) -> None:
    assert isinstance(by_class.platform, OpenvinoPlatform)
    assert (by_class.name, by_class.class_path, by_class.problem) == ("openvino", CLASS_PATH, None)
    assert by_class.entry is not None and by_class.entry.value == "kvrun_openvino:probe"
    # The probe is still called; here it accepts the machine, so the engine can select it.
    assert by_class.probe_result == "kvrun_openvino.platform.OpenvinoPlatform"
    assert by_class.engine_can_select
    assert by_class.platform.env.VLLM_TARGET_DEVICE == "openvino"


def test_class_paths_that_name_no_platform_are_refused() -> None:
    with pytest.raises(ValueError) as raised:
        import_platform_class("OpenvinoPlatform")
    assert str(raised.value) == (
        "platform class path 'OpenvinoPlatform' is not of the form 'package.module:Class'"
    )
    with pytest.raises(ValueError) as raised:
        import_platform_class("kvrun.errors:ConfigError")
    assert str(raised.value) == (
        "platform class path 'kvrun.errors:ConfigError' names "
        "<class 'kvrun.errors.ConfigError'>, not a kvrun.platforms.Platform subclass"
    )
    assert import_platform_class("kvrun_openvino.platform.OpenvinoPlatform") is OpenvinoPlatform
    target = load_target(None, "kvrun_openvino.platform:NoSuch")
    assert target.platform is None and target.problem is not None
    assert target.problem.startswith(
        "platform class path 'kvrun_openvino.platform:NoSuch' cannot be imported: AttributeError("
    )


def test_an_engine_given_the_platform_matches_one_that_selects_it(
    by_class: KitTarget, model_dir: Path
) -> None:
    # What the kit does for class-path targets, on a platform the engine can also select.
    platform = by_class.require()
    prompts = parity.kit_prompts()
    selected = parity.engine_greedy(model_dir, platform.env, torch.float32, None, prompts, 16)
    given = parity.engine_greedy(
        model_dir, platform.env, torch.float32, None, prompts, 16, platform=platform
    )
    assert given == selected
    assert [len(t) for t in given] == [parity.MAX_NEW_TOKENS] * len(prompts)


class ShortExecutor(OpenvinoExecutor):
    """Allocates one block fewer than the plan it reports: the bug the kit must catch."""

    def init_kv_cache(self, num_blocks: int | None, max_model_len: int) -> KVCachePlan:
        asked = num_blocks or self.budget[0] // self.bytes_per_block
        plan = super().init_kv_cache(asked - 1, max_model_len)
        return dataclasses.replace(
            plan,
            num_blocks=asked,
            layer_shape=(asked, *plan.layer_shape[1:]),
            budget_bytes=asked * self.bytes_per_block,
        )


class ShortPlatform(OpenvinoPlatform):
    def model_executor(self, config: EngineConfig) -> OpenvinoExecutor:
        built = super().model_executor(config)
        return ShortExecutor(built.compiled, built.budget, None)


def test_the_kit_catches_an_executor_that_allocates_less_than_it_reports(
    by_class: KitTarget, model_dir: Path
) -> None:
    platform = ShortPlatform(by_class.require().env)
    case = executor_checks.make_case(platform, model_dir, torch.float32)
    assert case is not None and case.config.block_size == 32 and case.min_blocks == 8
    per_block = 2 * 2 * 32 * 2 * 16 * 4  # K and V, 2 layers, 32 tokens, 2 heads of 16, f32
    with pytest.raises(AssertionError) as raised:
        executor_checks.check_executor_explicit_blocks(case)
    assert str(raised.value).splitlines()[0] == (
        f"openvino executor (float32) init_kv_cache(11): the plan reports {11 * per_block} "
        f"bytes of KV cache, but the executor allocated {10 * per_block} bytes of cache "
        "tensors (11 blocks)"
    )


def test_the_kit_s_command_line_takes_a_platform_class(tmp_path: Path) -> None:
    # The vendor's route: the kit's pytest plugin with --kvrun-platform-class, run from an
    # empty directory so that it collects the kit alone.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "kvrun.testing.conformance"),
            *("-p", "no:cacheprovider", "-W", "error", "-v", "-k", "contract"),
            f"--kvrun-platform-class={CLASS_PATH}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.findall(r"::TestKvrunConformance::(\S+) PASSED", result.stdout)
    assert sorted(passed) == [
        "test_contract_attention_backends",
        "test_contract_entry_points",
        "test_contract_identity",
        "test_contract_ops",
        "test_contract_probe",
    ]
