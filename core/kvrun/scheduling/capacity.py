"""How many KV blocks one sequence needs, and the one check that a cache holds it.

Every KV cache kvrun plans (a platform's budget, an explicit ``num_kv_blocks``, a
cache less the blocks a platform reserves, a whole-model executor's own cache, the
scheduler's) must hold one sequence of ``max_model_len``; each refuses in the same
words, naming what holds the blocks and what to change.
"""

from __future__ import annotations

from kvrun.errors import ConfigError

__all__ = ["blocks_needed", "require_blocks"]


def blocks_needed(max_model_len: int, block_size: int) -> int:
    """Blocks one sequence of ``max_model_len`` tokens fills."""
    return -(-max_model_len // block_size)


def require_blocks(
    num_blocks: int, *, block_size: int, max_model_len: int, holder: str, remedy: str
) -> None:
    """Refuse (ConfigError) a cache of ``num_blocks`` too small for one sequence.

    ``holder`` names the cache ("num_kv_blocks=8", "the cpu KV-cache budget of ..."),
    ``remedy`` says what to change.
    """
    need = blocks_needed(max_model_len, block_size)
    if num_blocks < need:
        raise ConfigError(
            f"{holder} holds {num_blocks} blocks of {block_size} tokens, but one sequence of "
            f"max_model_len={max_model_len} needs {need}; {remedy}"
        )
