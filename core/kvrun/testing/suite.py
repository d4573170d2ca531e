"""The conformance kit's tests, as a class a vendor's test module can subclass.

``class TestAcme(ConformanceSuite): kvrun_platform = "acme"`` runs every check on the
platform whose entry point is named ``acme``; without the attribute the platform is
the ``--kvrun-platform`` option of :mod:`kvrun.testing.conformance`.
``kvrun_platform_class = "pkg.mod:Class"`` (``--kvrun-platform-class``) instead builds
the class without the probe's verdict, for a simulator or a CPU build of a device.
Test names say which contract item they check (``test_contract_*``, ``test_op_*``,
``test_attention_*``, ``test_kv_*``, ``test_greedy_parity``); ids say which op,
shape, backend, scenario and dtype. ``kvrun_known_failures`` marks tests a platform
is known to fail as strict xfails, so a fix is noticed as soon as it lands.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.errors import ConfigError
from kvrun.ops import OP_NAMES, reference_ops
from kvrun.platforms import Platform, Unavailable
from kvrun.plugin_api import SUPPORTED
from kvrun.testing import attention_checks, executor_checks, kv_checks, op_checks, parity
from kvrun.testing.collection import kit_params, kit_target, num_kv_blocks
from kvrun.testing.target import KitTarget, dtype_name

__all__ = ["ConformanceSuite"]


class ConformanceSuite:
    """Every check of the Platform contract; see docs/writing-a-backend.md."""

    kvrun_platform: ClassVar[str | None] = None
    # "pkg.mod:Class": construct this Platform subclass without its probe's verdict.
    kvrun_platform_class: ClassVar[str | None] = None
    # EnvSnapshot fields (typed values) the platform gets on top of the process's VLLM_*.
    kvrun_env: ClassVar[Mapping[str, Any]] = {}
    # KV blocks greedy parity runs with; None = the platform's own budget. For a
    # simulator that reports no device memory.
    kvrun_num_kv_blocks: ClassVar[int | None] = None
    # "test_name[id]" pattern ("*" matches anything) -> reason; run as strict xfails.
    kvrun_known_failures: ClassVar[Mapping[str, str]] = {}

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        target = kit_target(metafunc.cls, metafunc.config)
        dtypes = target.dtypes
        args = metafunc.fixturenames
        if "op_case" in args:
            overridden = set(target.op_names)
            cases = [c for c in op_checks.OP_CASES if overridden.intersection(c.uses)]
            combos = [(c, d) for c in cases for d in dtypes]
            metafunc.parametrize(
                "op_case",
                kit_params(
                    metafunc,
                    target,
                    combos,
                    lambda cd: f"{cd[0].op}-{cd[0].label}-{dtype_name(cd[1])}",
                    f"platform {target.name!r} overrides no op: all run the core's reference",
                ),
            )
        if "attention_case" in args:
            attention_combos = [
                (b, spec, s, d)
                for b in target.backend_names
                for spec in attention_checks.specs_for(target.backend_class(b))
                for s in attention_checks.SCENARIOS
                for d in dtypes
            ]
            metafunc.parametrize(
                "attention_case",
                kit_params(
                    metafunc,
                    target,
                    attention_combos,
                    lambda c: f"{c[0]}-{c[1][0]}-{c[2].name}-{dtype_name(c[3])}",
                ),
            )
        if "kv_dtype" in args:
            metafunc.parametrize("kv_dtype", kit_params(metafunc, target, dtypes, dtype_name))
        if "parity_backend" in args:
            platform = target.platform
            backends = target.backend_names
            if platform is not None and _overrides_executor(platform):
                backends = [platform.default_attention_backend]  # attention is in its graph
            metafunc.parametrize("parity_backend", kit_params(metafunc, target, backends, str))

    # fixtures ------------------------------------------------------------------------
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def kvrun_one_cpu_thread(cls) -> Iterator[None]:
        """Run the kit with one intra-op CPU thread, then restore the count.

        Its shapes are tiny: threads only wait on each other, which on a busy machine
        costs far more than the ops themselves.
        """
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    @pytest.fixture(scope="class")
    @classmethod
    def kvrun_target(cls, request: pytest.FixtureRequest) -> KitTarget:
        return kit_target(request.cls, request.config)

    @pytest.fixture(scope="class")
    @classmethod
    def kvrun_platform_obj(cls, kvrun_target: KitTarget) -> Platform:
        return kvrun_target.require()

    @pytest.fixture(scope="class")
    @classmethod
    def kvrun_model_dir(cls, kvrun_platform_obj: Platform) -> Path:
        # Under VLLM_CACHE_ROOT, so later runs skip the build (transformers, ~5 s).
        root = Path(kvrun_platform_obj.env.VLLM_CACHE_ROOT) / "kvrun_testing"
        return parity.cached_tiny_llama(root)

    @pytest.fixture(scope="class")
    @classmethod
    def kvrun_whole_model(
        cls, kvrun_platform_obj: Platform, request: pytest.FixtureRequest
    ) -> str | None:
        """Why the per-kernel checks do not apply (a whole-model executor), or None."""
        platform = kvrun_platform_obj
        if _executor_case(platform, request, _parity_dtype(platform)) is None:
            return None
        return (
            f"platform {platform.name!r} runs the whole model in its own executor: its kernels "
            "and attention are covered by test_greedy_parity"
        )

    @pytest.fixture(scope="class")
    @classmethod
    def kvrun_reference(
        cls, kvrun_platform_obj: Platform, kvrun_model_dir: Path
    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        platform = kvrun_platform_obj
        return parity.reference_greedy(
            kvrun_model_dir, parity.kit_prompts(), _parity_dtype(platform), platform.device
        )

    # contract ------------------------------------------------------------------------
    def test_contract_entry_points(self, kvrun_target: KitTarget) -> None:
        entry = kvrun_target.entry
        assert entry is not None, f"contract: {kvrun_target.problem}"
        assert entry.api_version is not None and entry.api_version in SUPPORTED, (
            f"contract: plugin-API entry point: {entry.refused}"
        )
        assert entry.refused is None, f"contract: the core refuses the plugin: {entry.refused}"

    def test_contract_probe(self, kvrun_target: KitTarget) -> None:
        assert kvrun_target.entry is not None, f"contract: {kvrun_target.problem}"
        assert kvrun_target.probe_error is None, (
            f"contract: the probe {kvrun_target.entry.value} raised {kvrun_target.probe_error}; "
            "a probe returns None or kvrun.platforms.Unavailable(reason) instead of raising"
        )
        result = kvrun_target.probe_result
        ok = (
            result is None
            or isinstance(result, Unavailable | str)
            or (isinstance(result, type) and issubclass(result, Platform))
        )
        assert ok, (
            f"contract: the probe returned {result!r}; accepted: a Platform subclass, its "
            "dotted path, None or kvrun.platforms.Unavailable"
        )
        assert kvrun_target.platform is not None, (
            f"contract: platform {kvrun_target.name!r} is not usable here, so nothing else "
            f"can be checked: {kvrun_target.problem}"
        )

    def test_contract_identity(self, kvrun_platform_obj: Platform) -> None:
        p = kvrun_platform_obj
        cls = type(p)
        assert not inspect.isabstract(cls), f"contract: {cls.__qualname__} is abstract"
        for attr in ("name", "device_type", "dist_backend"):
            value = getattr(cls, attr, None)
            assert isinstance(value, str) and value, (
                f"contract: {cls.__qualname__}.{attr} is {value!r}; it must be a non-empty str"
            )
        torch.device(p.device_type)  # raises for a device type torch does not know
        dtypes = cls.supported_dtypes
        assert isinstance(dtypes, tuple) and dtypes, (
            f"contract: {cls.__qualname__}.supported_dtypes is {dtypes!r}; "
            "it must be a non-empty tuple of torch dtypes"
        )
        assert all(isinstance(d, torch.dtype) for d in dtypes), (
            f"contract: {cls.__qualname__}.supported_dtypes holds a non-dtype: {dtypes!r}"
        )
        assert p.default_dtype() in dtypes, (
            f"contract: default_dtype() is {p.default_dtype()}, not one of {dtypes}"
        )
        assert isinstance(cls.priority, int), f"contract: priority is {cls.priority!r}, not int"
        assert p.device.type == p.device_type, f"contract: device {p.device} is not {p.device_type}"

    def test_contract_attention_backends(self, kvrun_platform_obj: Platform) -> None:
        p = kvrun_platform_obj
        backends = dict(p.attention_backends())
        assert backends, "contract: attention_backends() is empty; offer at least one backend"
        assert p.default_attention_backend in backends, (
            f"contract: default_attention_backend {p.default_attention_backend!r} is not one of "
            f"attention_backends(): {', '.join(sorted(backends))}"
        )
        for key, cls in backends.items():
            assert isinstance(cls, type) and issubclass(cls, AttentionBackend), (
                f"contract: attention_backends()[{key!r}] is {cls!r}, not an AttentionBackend class"
            )
            assert cls.name == key, (
                f"contract: attention_backends() offers {cls.__qualname__} as {key!r} "
                f"but its name is {cls.name!r}"
            )
        spec = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
        chosen = p.attention_backend(None, spec)
        assert isinstance(chosen, backends[p.default_attention_backend]), (
            f"contract: attention_backend(None, spec) returned {type(chosen).__qualname__}, "
            f"not the default {p.default_attention_backend!r}"
        )

    def test_contract_ops(self, kvrun_platform_obj: Platform) -> None:
        ops = dict(kvrun_platform_obj.ops())
        unknown = sorted(set(ops) - set(OP_NAMES))
        assert not unknown, (
            f"contract: ops() overrides unknown op(s) {', '.join(unknown)}; "
            f"known ops: {', '.join(OP_NAMES)}"
        )
        for name, fn in ops.items():
            assert callable(fn), f"contract: ops()[{name!r}] is {fn!r}, not callable"
        reference_ops().with_overrides(ops, f"platform {kvrun_platform_obj.name!r}")

    # kernels -------------------------------------------------------------------------
    def test_op_matches_reference(
        self,
        kvrun_target: KitTarget,
        op_case: tuple[op_checks.OpCase, torch.dtype] | None,
        request: pytest.FixtureRequest,
    ) -> None:
        platform = kvrun_target.require()
        assert op_case is not None
        skip = request.getfixturevalue("kvrun_whole_model")
        if skip:
            pytest.skip(skip)
        case, dtype = op_case
        ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
        op_checks.check_op(case, ops, dtype, platform.device)

    def test_attention_matches_reference(
        self,
        kvrun_target: KitTarget,
        attention_case: tuple[str, tuple[str, AttentionLayerSpec], Any, torch.dtype] | None,
        request: pytest.FixtureRequest,
    ) -> None:
        platform = kvrun_target.require()
        assert attention_case is not None
        skip = request.getfixturevalue("kvrun_whole_model")
        if skip:
            pytest.skip(skip)
        name, (_, spec), scenario, dtype = attention_case
        try:
            backend = platform.attention_backend(name, spec)
        except ConfigError as exc:  # a backend may refuse a head layout it has no kernel for
            pytest.skip(f"attention backend {name!r} refuses this layer: {exc}")
        attention_checks.check_backend(backend, scenario, dtype, platform.device)

    # KV allocator --------------------------------------------------------------------
    # A whole-model executor plans and allocates its own cache (the engine never calls the
    # platform's allocator then), so these check the executor's init_kv_cache instead.
    def test_kv_plan_within_budget(
        self, kvrun_target: KitTarget, kv_dtype: torch.dtype | None, request: pytest.FixtureRequest
    ) -> None:
        platform = kvrun_target.require()
        assert kv_dtype is not None
        case = _executor_case(platform, request, kv_dtype)
        if case is None:
            kv_checks.check_plan(platform, kv_dtype)
        else:
            executor_checks.check_executor_plan(case)

    def test_kv_refuses_budget_below_one_sequence(
        self, kvrun_target: KitTarget, kv_dtype: torch.dtype | None, request: pytest.FixtureRequest
    ) -> None:
        platform = kvrun_target.require()
        assert kv_dtype is not None
        case = _executor_case(platform, request, kv_dtype)
        if case is None:
            kv_checks.check_refuses_small_budget(platform, kv_dtype)
        else:
            executor_checks.check_executor_refuses_small_budget(case)

    def test_kv_allocation_matches_plan(
        self, kvrun_target: KitTarget, kv_dtype: torch.dtype | None, request: pytest.FixtureRequest
    ) -> None:
        platform = kvrun_target.require()
        assert kv_dtype is not None
        case = _executor_case(platform, request, kv_dtype)
        if case is None:
            kv_checks.check_allocation(platform, kv_dtype)
        else:
            executor_checks.check_executor_explicit_blocks(case)

    # end to end ----------------------------------------------------------------------
    def test_greedy_parity(
        self,
        kvrun_target: KitTarget,
        parity_backend: str | None,
        kvrun_model_dir: Path,
        kvrun_reference: tuple[list[list[int]], list[list[torch.Tensor]]],
        request: pytest.FixtureRequest,
    ) -> None:
        platform = kvrun_target.require()
        assert parity_backend is not None
        dtype = _parity_dtype(platform)
        prompts = parity.kit_prompts()
        blocks = num_kv_blocks(request.cls, request.config)
        # A class-path target's probe refuses this machine: hand the engine the platform.
        given = None if kvrun_target.engine_can_select else platform
        got = parity.engine_greedy(
            kvrun_model_dir, platform.env, dtype, parity_backend, prompts, blocks, platform=given
        )
        want, logits = kvrun_reference
        bad = parity.compare_greedy(got, want, logits, dtype)
        assert not bad, (
            f"greedy parity with the reference on a tiny random Llama ({dtype_name(dtype)}, "
            f"attention backend {parity_backend}): "
            + "; ".join(m.describe() for m in bad)
            + f"\nplatform tokens:  {got}\nreference tokens: {want}"
        )


def _overrides_executor(platform: Platform) -> bool:
    return type(platform).model_executor is not Platform.model_executor


def _executor_case(
    platform: Platform, request: pytest.FixtureRequest, dtype: torch.dtype
) -> executor_checks.ExecutorCase | None:
    """The executor the engine would build for the kit's model in ``dtype``; None when the
    platform runs the core model (no executor, or model_executor() returns None)."""
    if not _overrides_executor(platform):
        return None  # no model needed to know that
    model_dir: Path = request.getfixturevalue("kvrun_model_dir")
    return executor_checks.make_case(platform, model_dir, dtype)


def _parity_dtype(platform: Platform) -> torch.dtype:
    # float32 where offered: greedy choices then differ only at true ties.
    return torch.float32 if torch.float32 in platform.supported_dtypes else platform.default_dtype()
