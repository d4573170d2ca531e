"""Test support shipped with kvrun: real checkpoints and (later) the conformance kit.

Nothing here imports pytest at module level; pytest plugins and fixtures wrap it.
"""

__all__: list[str] = []
