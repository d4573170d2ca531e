"""How many KV blocks one sequence needs, and the one check that a cache holds it.

Every KV cache kvrun plans (a platform's budget, an explicit ``num_kv_blocks``, a
cache less the blocks a platform reserves, a whole-model executor's own cache, the
scheduler's) must hold one sequence of ``max_model_len``; each refuses in the same
words, naming what holds the blocks and what to change.

A model whose every attention layer has a sliding window of W positions (Mistral v0.1)
holds fewer: the scheduler releases a running sequence's blocks that no later query can
see (:meth:`kvrun.scheduling.block_manager.BlockManager.release_before`), so a sequence
holds at most the blocks a step reads and writes, however long it grows. A model with
any global layer (Gemma's interleaved local and global layers) releases nothing: its
layers share one block table and the global ones read every position.
"""

from __future__ import annotations

from kvrun.errors import ConfigError

__all__ = ["blocks_needed", "require_blocks"]


def blocks_needed(
    max_model_len: int,
    block_size: int,
    sliding_window: int | None = None,
    max_chunk_tokens: int | None = None,
) -> int:
    """Blocks one sequence of ``max_model_len`` tokens holds at most.

    Without ``sliding_window``: every block it fills. With one (every layer windowed, its
    blocks released as it runs): the blocks of one step's span, the W - 1 positions a
    chunk's first query sees before it and the chunk of up to ``max_chunk_tokens``
    (the step's token budget; None = max_model_len), wherever the span falls among
    blocks; never more than the sequence fills.
    """
    full = -(-max_model_len // block_size)
    if sliding_window is None:
        return full
    span = sliding_window - 1 + (max_chunk_tokens or max_model_len)
    return min(full, -(-span // block_size) + 1)


def require_blocks(
    num_blocks: int,
    *,
    block_size: int,
    max_model_len: int,
    holder: str,
    remedy: str,
    sliding_window: int | None = None,
    max_chunk_tokens: int | None = None,
) -> None:
    """Refuse (ConfigError) a cache of ``num_blocks`` too small for one sequence.

    ``holder`` names the cache ("num_kv_blocks=8", "the cpu KV-cache budget of ..."),
    ``remedy`` says what to change; ``sliding_window`` and ``max_chunk_tokens`` as in
    :func:`blocks_needed`.
    """
    need = blocks_needed(max_model_len, block_size, sliding_window, max_chunk_tokens)
    if num_blocks < need:
        window = (
            f" (a sliding window of {sliding_window} and steps of up to "
            f"{max_chunk_tokens or max_model_len} tokens)"
            if sliding_window is not None and need < blocks_needed(max_model_len, block_size)
            else ""
        )
        raise ConfigError(
            f"{holder} holds {num_blocks} blocks of {block_size} tokens, but one sequence of "
            f"max_model_len={max_model_len} needs {need}{window}; {remedy}"
        )
