"""How the conformance suite is collected: which platform, and known failures as xfails.

The platform comes from the ConformanceSuite subclass's attributes, else from the
options of :mod:`kvrun.testing.conformance`. Nothing here checks anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from kvrun.testing.target import KitTarget, load_target

__all__ = ["NO_PLATFORM", "kit_params", "kit_target", "num_kv_blocks"]

NO_PLATFORM = "no-platform"  # the one id collected when the platform cannot be loaded


def kit_target(cls: type | None, config: pytest.Config) -> KitTarget:
    """The class's platform, else the command line's; a UsageError when neither names one."""

    def pick(attr: str) -> Any:
        return getattr(cls, attr, None) or config.getoption(attr, None)

    name, class_path = pick("kvrun_platform"), pick("kvrun_platform_class")
    if name is None and class_path is None:
        raise pytest.UsageError(
            f"{cls.__name__ if cls else 'the kit'} has no platform to test: pass "
            "--kvrun-platform=NAME or --kvrun-platform-class=pkg.mod:Class (with -p "
            "kvrun.testing.conformance) or set kvrun_platform on the ConformanceSuite subclass"
        )
    overrides: Mapping[str, Any] = getattr(cls, "kvrun_env", {})
    return load_target(name, class_path, tuple(sorted(overrides.items())))


def num_kv_blocks(cls: type | None, config: pytest.Config) -> int | None:
    value = getattr(cls, "kvrun_num_kv_blocks", None) or config.getoption(
        "kvrun_num_kv_blocks", None
    )
    return int(value) if value else None


def kit_params(
    metafunc: pytest.Metafunc,
    target: KitTarget,
    values: list[Any],
    ids: Callable[[Any], str],
    nothing: str = "",
) -> list[Any]:
    """One param per value, strict-xfail where the class lists the test as a known failure.

    No values: one test that fails with the reason when there is no platform, else one
    skipped with ``nothing`` (a platform that overrides no op has none to check).
    """
    if not values and target.platform is None:  # fail with the reason, not pass by absence
        return [pytest.param(None, id=NO_PLATFORM)]
    if not values:
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=nothing))]
    known: Mapping[str, str] = getattr(metafunc.cls, "kvrun_known_failures", {})
    params = []
    for value in values:
        test_id = ids(value)
        full = f"{metafunc.function.__name__}[{test_id}]"
        reasons = [why for pattern, why in known.items() if _matches(pattern, full)]
        # strict: a fixed bug turns the xfail into a failure, so the list cannot go stale.
        marks = [pytest.mark.xfail(reason=reasons[0], strict=True)] if reasons else []
        params.append(pytest.param(value, id=test_id, marks=marks))
    return params


def _matches(pattern: str, test: str) -> bool:
    # Only "*" is special: test ids are full of the brackets fnmatch would read.
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), test) is not None
