"""Test support shipped with kvrun: real checkpoints and the vendor conformance kit.

- :mod:`kvrun.testing.checkpoints`: tiny real checkpoints and tokenizers (no pytest).
- :mod:`kvrun.testing.conformance`: the kit's pytest plugin
  (``pytest -p kvrun.testing.conformance --kvrun-platform=NAME``).
- :mod:`kvrun.testing.suite`: the kit's tests as ``ConformanceSuite``, to subclass
  (:mod:`kvrun.testing.collection`: which platform, and known failures as xfails).
- ``target``, ``op_checks``, ``attention_checks``, ``kv_checks``, ``executor_checks``,
  ``parity``: the checks themselves, plain functions raising AssertionError (no pytest).

Importing this package imports none of them.
"""

__all__: list[str] = []
