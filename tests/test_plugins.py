"""Plugin discovery, API-version refusal, platform selection and general-plugin hooks.

The plugins are real installed distributions: the first-party ones in the
environment, the fixtures (tests/fixtures/) built by tests/support/fixture_plugins.py
into a directory that each test puts on sys.path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kvrun.envs import read_env
from kvrun.errors import PluginError
from kvrun.platforms import KVCacheRequest
from kvrun.plugins import (
    choose_platform,
    create_platform,
    discover_platforms,
    load_general_plugins,
    run_general_plugins,
    select_platform,
)
from tests.support.fixture_plugins import install_fixture_plugins

SUPPORTS = "this kvrun 0.1.0 supports v1"
BROKEN = "RuntimeError: kvrun_fixture_broken fails on import on purpose"
ABSENT_ACCEL = "fixture accelerator absent: KVRUN_FIXTURE_ACCEL_PRESENT is not 1"
# The fixture platforms plus cpu: selection cases name these so that a real accelerator
# on the test machine does not change the outcome.
FIXTURES = "cpu,fixtureabsent,fixtureaccel,fixturebroken,fixturev99"


@pytest.fixture(scope="session")
def fixture_site() -> Path:
    return install_fixture_plugins()


@pytest.fixture
def fixtures(fixture_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(fixture_site))
    monkeypatch.delenv("KVRUN_FIXTURE_ACCEL_PRESENT", raising=False)
    monkeypatch.delenv("KVRUN_FIXTURE_GENERAL_RECORD", raising=False)
    return fixture_site


class _ImportSpy:
    """A meta-path finder that records attempts to import one package, and finds nothing."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.attempts: list[str] = []

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        if name.split(".")[0] == self.package:
            self.attempts.append(name)


@pytest.fixture
def v99_import_spy() -> Iterator[_ImportSpy]:
    spy = _ImportSpy("kvrun_fixture_v99")
    sys.meta_path.insert(0, spy)
    try:
        yield spy
    finally:
        sys.meta_path.remove(spy)


# ---------------------------------------------------------------------- discovery


def test_discovery_reports_each_fixture_with_its_reason(fixtures: Path) -> None:
    infos = {i.name: i for i in discover_platforms(None)}
    absent = infos["fixtureabsent"]
    assert (absent.distribution, absent.version, absent.api_version) == (
        "kvrun-fixture-absent",
        "0.1.0",
        1,
    )
    assert (absent.usable, absent.reason, absent.priority) == (
        False,
        "fixture hardware not present",
        None,
    )
    assert (infos["fixtureaccel"].usable, infos["fixtureaccel"].reason) == (False, ABSENT_ACCEL)
    broken = infos["fixturebroken"]
    assert (broken.usable, broken.api_version) == (False, 1)
    assert broken.reason == f"importing kvrun_fixture_broken:probe raised {BROKEN}"
    cpu = infos["cpu"]
    assert (cpu.usable, cpu.priority, cpu.reason) == (
        True,
        0,
        "probe kvrun_cpu:probe returned kvrun_cpu.platform.CpuPlatform",
    )
    assert cpu.platform_class is not None and cpu.platform_class.__name__ == "CpuPlatform"


def test_usable_fixture_accelerator_reports_its_class_and_priority(
    fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVRUN_FIXTURE_ACCEL_PRESENT", "1")
    accel = {i.name: i for i in discover_platforms(["fixtureaccel"])}["fixtureaccel"]
    assert (accel.usable, accel.priority, accel.reason) == (
        True,
        50,
        "probe kvrun_fixture_accel:probe returned "
        "kvrun_fixture_accel.platform.FixtureAccelPlatform",
    )


def test_incompatible_api_is_refused_without_importing(
    fixtures: Path, v99_import_spy: _ImportSpy
) -> None:
    infos = {i.name: i for i in discover_platforms(None)}
    general = {i.name: i for i in run_general_plugins(None).infos}
    dist = "(dist kvrun-fixture-v99 0.1.0)"
    assert infos["fixturev99"].reason == (
        f"plugin 'fixturev99' {dist} implements kvrun plugin API v99; {SUPPORTS}"
    )
    assert infos["fixturev99"].api_version == 99
    assert general["fixturev99"].reason == infos["fixturev99"].reason
    assert infos["fixturenoapi"].reason == (
        f"plugin 'fixturenoapi' {dist} declares no kvrun plugin API version (add "
        'fixturenoapi = "kvrun.plugin_api:v1" under [project.entry-points."kvrun.plugin_api"]); '
        f"{SUPPORTS}"
    )
    assert infos["fixturebadapi"].reason == (
        f"plugin 'fixturebadapi' {dist} declares kvrun plugin API 'kvrun.plugin_api:latest', "
        f"which is not of the form 'kvrun.plugin_api:vN'; {SUPPORTS}"
    )
    assert [infos[n].usable for n in ("fixturev99", "fixturenoapi", "fixturebadapi")] == [
        False,
        False,
        False,
    ]
    # Importing the module raises "MUST NOT BE IMPORTED"; no import was even attempted.
    assert v99_import_spy.attempts == []


def test_plugins_filter_excludes_before_importing(fixtures: Path) -> None:
    infos = {i.name: i for i in discover_platforms(["fixtureabsent"])}
    assert infos["fixtureabsent"].reason == "fixture hardware not present"
    assert infos["fixturebroken"].reason == (
        "not loaded: VLLM_PLUGINS=fixtureabsent does not name it"
    )
    assert infos["cpu"].usable is False
    empty = {i.name: i for i in discover_platforms([])}
    assert {i.reason for i in empty.values()} == {
        "not loaded: VLLM_PLUGINS is set but empty, so no plugin is loaded"
    }


def test_a_name_two_distributions_register_is_refused_in_both(fixtures: Path) -> None:
    clashing = [i for i in discover_platforms(None) if i.name == "fixtureclash"]
    assert [(i.distribution, i.usable, i.reason) for i in clashing] == [
        (
            "kvrun-fixture-absent",
            False,
            "the entry-point name 'fixtureclash' in kvrun.platform_plugins is also registered "
            "by dist kvrun-fixture-clash 0.1.0; uninstall one of them",
        ),
        (
            "kvrun-fixture-clash",
            False,
            "the entry-point name 'fixtureclash' in kvrun.platform_plugins is also registered "
            "by dist kvrun-fixture-absent 0.1.0; uninstall one of them",
        ),
    ]


# ---------------------------------------------------------------------- first-party probes


def _expected_hardware_reasons() -> dict[str, str | None]:
    """What each first-party probe must say on this machine; None = usable."""
    version = torch.__version__
    expected: dict[str, str | None] = {}
    if torch.version.hip is not None:
        expected["cuda"] = (
            f"torch {version} is a ROCm build (torch.version.hip is {torch.version.hip}); "
            "the rocm plugin drives it"
        )
    elif torch.version.cuda is None:
        expected["cuda"] = f"torch {version} is a CPU-only build (torch.version.cuda is None)"
    elif not torch.cuda.is_available():
        expected["cuda"] = (
            f"torch {version} (CUDA {torch.version.cuda}) sees no NVIDIA GPU "
            "(torch.cuda.is_available() is False; check the driver and CUDA_VISIBLE_DEVICES)"
        )
    else:
        expected["cuda"] = None
    if torch.version.hip is None:
        expected["rocm"] = f"torch {version} is not a ROCm build (torch.version.hip is None)"
    if importlib.util.find_spec("openvino") is None:
        expected["openvino"] = 'openvino is not installed: pip install "kvrun[openvino]"'
    if importlib.util.find_spec("torch_xla") is None:
        expected["tpu"] = 'torch_xla is not installed: pip install "kvrun[tpu]"'
    if importlib.util.find_spec("habana_frameworks") is None:
        expected["hpu"] = (
            "habana_frameworks is not installed: the Intel Gaudi software stack comes from "
            "Intel's Gaudi installer or Docker images, not PyPI"
        )
    return expected


def test_first_party_probes_report_this_machine() -> None:
    infos = {i.name: i for i in discover_platforms(None)}
    expected = _expected_hardware_reasons()
    # Every first-party plugin is installed (`pip install --no-deps -e plugins/<hw>`).
    assert {"cpu", "cuda", "hpu", "openvino", "rocm", "tpu"} <= set(infos)
    for name in ("cuda", "hpu", "openvino", "rocm", "tpu"):
        info = infos[name]
        assert (info.distribution, info.version, info.api_version) == (f"kvrun-{name}", "0.1.0", 1)
        if name not in expected:
            continue  # the stack is installed here; its answer depends on the hardware
        reason = expected[name]
        if reason is None:
            assert info.usable, info.reason
        else:
            assert (info.usable, info.reason) == (False, reason)


# ---------------------------------------------------------------------- selection


# fmt: off
CASES = [
    # (VLLM_TARGET_DEVICE, VLLM_PLUGINS, KVRUN_FIXTURE_ACCEL_PRESENT, selected, reason or errors)
    (None, FIXTURES, None, "cpu", ["VLLM_TARGET_DEVICE is unset: cpu is the only usable platform (priority 0)"]),
    (None, FIXTURES, "1", "fixtureaccel", ["VLLM_TARGET_DEVICE is unset: fixtureaccel has the highest priority of the usable platforms: fixtureaccel (50), cpu (0)"]),
    (None, "fixtureaccel", "1", "fixtureaccel", ["VLLM_TARGET_DEVICE is unset: fixtureaccel is the only usable platform (priority 50)"]),
    ("cpu", FIXTURES, "1", "cpu", ["VLLM_TARGET_DEVICE=cpu"]),
    ("CPU", FIXTURES, "1", "cpu", ["VLLM_TARGET_DEVICE=cpu"]),
    ("fixtureaccel", FIXTURES, "1", "fixtureaccel", ["VLLM_TARGET_DEVICE=fixtureaccel"]),
    ("fixtureaccel", FIXTURES, None, None, [
        "VLLM_TARGET_DEVICE=fixtureaccel, but its platform plugin fixtureaccel "
        f"(kvrun-fixture-accel 0.1.0) is not usable: {ABSENT_ACCEL}\nInstalled platform plugins:\n",
        "  cpu (kvrun-cpu 0.1.0): usable\n",
        "  fixtureabsent (kvrun-fixture-absent 0.1.0): not usable: fixture hardware not present\n",
    ]),
    ("fixtureabsent", FIXTURES, None, None, [
        "VLLM_TARGET_DEVICE=fixtureabsent, but its platform plugin fixtureabsent "
        "(kvrun-fixture-absent 0.1.0) is not usable: fixture hardware not present\n",
    ]),
    ("fixturebroken", FIXTURES, None, None, [
        "VLLM_TARGET_DEVICE=fixturebroken, but its platform plugin fixturebroken "
        "(kvrun-fixture-broken 0.1.0) is not usable: importing kvrun_fixture_broken:probe "
        f"raised {BROKEN}\n",
    ]),
    ("fixturev99", FIXTURES, None, None, [
        "VLLM_TARGET_DEVICE=fixturev99, but its platform plugin fixturev99 "
        "(kvrun-fixture-v99 0.1.0) is not usable: plugin 'fixturev99' (dist kvrun-fixture-v99 "
        f"0.1.0) implements kvrun plugin API v99; {SUPPORTS}\n",
    ]),
    # cpu is excluded by VLLM_PLUGINS and nothing else is usable
    (None, "fixtureabsent,fixturebroken", "1", None, [
        "no usable platform: VLLM_TARGET_DEVICE is unset (auto) and no installed platform "
        "plugin is usable.\nInstalled platform plugins:\n",
        "  cpu (kvrun-cpu 0.1.0): not usable: not loaded: VLLM_PLUGINS=fixtureabsent,"
        "fixturebroken does not name it\n",
        "  fixtureaccel (kvrun-fixture-accel 0.1.0): not usable: not loaded: "
        "VLLM_PLUGINS=fixtureabsent,fixturebroken does not name it\n",
        '\nInstall one with pip install "kvrun[DEVICE]", DEVICE one of: cpu, cuda, hpu, '
        "openvino, rocm, tpu",
    ]),
    (None, "", None, None, [
        "no usable platform: VLLM_TARGET_DEVICE is unset (auto) and no installed platform "
        "plugin is usable.\n",
        "  cpu (kvrun-cpu 0.1.0): not usable: not loaded: VLLM_PLUGINS is set but empty, so "
        "no plugin is loaded\n",
    ]),
    ("cpu", "fixtureaccel", "1", None, [
        "VLLM_TARGET_DEVICE=cpu, but its platform plugin cpu (kvrun-cpu 0.1.0) is not usable: "
        "not loaded: VLLM_PLUGINS=fixtureaccel does not name it\n",
        '\nInstall or repair it with: pip install "kvrun[cpu]"',
    ]),
    ("tpu", FIXTURES, None, None, [
        "VLLM_TARGET_DEVICE=tpu, but its platform plugin tpu (kvrun-tpu 0.1.0) is not usable: "
        f"not loaded: VLLM_PLUGINS={FIXTURES} does not name it\n",
        '\nInstall or repair it with: pip install "kvrun[tpu]"',
    ]),
    ("foo", FIXTURES, "1", None, [
        "VLLM_TARGET_DEVICE='foo' names no known device and no installed platform plugin; "
        "known devices: cpu, cuda, hpu, openvino, rocm, tpu.\nInstalled platform plugins:\n",
    ]),
]
# fmt: on


@pytest.mark.parametrize(("target", "plugins", "present", "selected", "texts"), CASES)
def test_selection_rules(
    fixtures: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str | None,
    plugins: str | None,
    present: str | None,
    selected: str | None,
    texts: list[str],
) -> None:
    environ = {"VLLM_PLUGINS": plugins} if plugins is not None else {}
    if target is not None:
        environ["VLLM_TARGET_DEVICE"] = target
    if present is not None:
        monkeypatch.setenv("KVRUN_FIXTURE_ACCEL_PRESENT", present)
    env = read_env(environ)
    if selected is not None:
        selection = select_platform(env)
        assert (selection.platform.name, selection.reason) == (selected, texts[0])
        assert selection.platform_class.name == selected
        assert {i.name for i in selection.infos} >= set(FIXTURES.split(","))
        return
    with pytest.raises(PluginError) as raised:
        select_platform(env)
    message = str(raised.value)
    assert message.startswith(texts[0].split("\n")[0])
    for text in texts:
        assert text in message


def test_known_device_without_a_plugin_names_the_install_command(fixtures: Path) -> None:
    infos = [i for i in discover_platforms(["cpu", "fixtureabsent"]) if i.name != "openvino"]
    with pytest.raises(PluginError) as raised:
        choose_platform(infos, "openvino")
    lines = str(raised.value).split("\n")
    assert lines[0] == (
        "VLLM_TARGET_DEVICE=openvino, but no installed plugin provides the 'openvino' platform."
    )
    assert lines[1] == "Installed platform plugins:"
    assert "  cpu (kvrun-cpu 0.1.0): usable" in lines
    assert (
        "  fixtureabsent (kvrun-fixture-absent 0.1.0): not usable: fixture hardware not present"
        in lines
    )
    assert lines[-1] == 'Install it with: pip install "kvrun[openvino]"'


def test_equal_priorities_are_broken_by_name_and_said_so(fixtures: Path) -> None:
    cpu = {i.name: i for i in discover_platforms(["cpu"])}["cpu"]
    twin = replace(cpu, name="aaatwin")
    selection = choose_platform([cpu, twin], None)
    assert selection.platform.name == "aaatwin"
    assert selection.reason == (
        "VLLM_TARGET_DEVICE is unset: aaatwin has the highest priority of the usable "
        "platforms: aaatwin (0), cpu (0); tied with cpu and chosen by name "
        "(set VLLM_TARGET_DEVICE to choose)"
    )


# ---------------------------------------------------------------------- general plugins


def test_general_plugin_runs_once_and_its_hook_result_is_visible(
    fixtures: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    monkeypatch.setenv("KVRUN_FIXTURE_GENERAL_RECORD", str(record))
    loaded = run_general_plugins(None)
    infos = {i.name: i for i in loaded.infos}
    general = infos["fixturegeneral"]
    assert (general.usable, general.hooks, general.reason) == (
        True,
        ("kvrun_model_architectures", "kvrun_platform_selected"),
        "kvrun_fixture_general:register() registered hooks: kvrun_model_architectures, "
        "kvrun_platform_selected",
    )
    assert (infos["fixturebroken"].usable, infos["fixturebroken"].reason) == (
        False,
        f"importing kvrun_fixture_broken:register raised {BROKEN}",
    )
    assert loaded.manager.hook.kvrun_model_architectures() == [
        {"FixtureForCausalLM": "kvrun_fixture_general.model:FixtureForCausalLM"}
    ]
    assert loaded.manager.get_plugin("fixturegeneral") is not None
    assert loaded.manager.get_plugin("fixturebroken") is None
    assert record.read_text().splitlines() == [f"ran in {os.getpid()}"]


def test_create_platform_constructs_and_notifies(
    fixtures: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record = tmp_path / "record.txt"
    monkeypatch.setenv("KVRUN_FIXTURE_GENERAL_RECORD", str(record))
    monkeypatch.setenv("KVRUN_FIXTURE_ACCEL_PRESENT", "1")
    env = read_env({"VLLM_PLUGINS": "fixtureaccel,fixturegeneral"})
    hooks = load_general_plugins(env.VLLM_PLUGINS)
    platform = create_platform(env, hooks)
    assert type(platform).__name__ == "FixtureAccelPlatform"
    assert platform.env is env
    request = KVCacheRequest(
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        block_size=16,
        dtype=torch.float32,
        max_model_len=64,
        layer_shape=lambda n: (2, n, 16, 2, 8),
    )
    plan = platform.plan_kv_cache(request)
    assert (plan.num_blocks, plan.reason) == (
        (1 << 30) // 4096,
        "fixture accelerator: a fixed 1 GiB",
    )
    assert record.read_text().splitlines()[1:] == ["selected fixtureaccel"]


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_general_plugins_filter_and_explicit_failure(fixtures: Path) -> None:
    only = {i.name: i for i in run_general_plugins(["fixturegeneral"]).infos}
    assert (
        only["fixturebroken"].reason == "not loaded: VLLM_PLUGINS=fixturegeneral does not name it"
    )
    assert only["fixturegeneral"].usable
    with pytest.raises(PluginError) as raised:
        load_general_plugins(["fixturebroken", "fixturegeneral"])
    assert str(raised.value) == (
        "general plugin 'fixturebroken' (dist kvrun-fixture-broken 0.1.0), named in "
        f"VLLM_PLUGINS, failed: importing kvrun_fixture_broken:register raised {BROKEN}"
    )
    # A handler on the logger itself: kvrun's logging set-up may stop propagation to root.
    handler = _ListHandler()
    logger = logging.getLogger("kvrun.plugins.general")
    logger.addHandler(handler)
    try:
        manager = load_general_plugins(None)
    finally:
        logger.removeHandler(handler)
    assert manager.get_plugin("fixturegeneral") is not None
    assert handler.messages == [
        "general plugin 'fixturebroken' (dist kvrun-fixture-broken 0.1.0) skipped: importing "
        f"kvrun_fixture_broken:register raised {BROKEN}",
        "general plugin 'fixturev99' (dist kvrun-fixture-v99 0.1.0) skipped: plugin 'fixturev99' "
        f"(dist kvrun-fixture-v99 0.1.0) implements kvrun plugin API v99; {SUPPORTS}",
    ]
