"""How one step's batch is cut into attention calls: decode groups and prefills.

Built once per step from the host-side lengths and shared by every layer, so the
per-layer work is only gathers and matmuls. Decodes (query length 1) are batched:
each group pads its sequences to the group's longest context and masks the tail,
and sequences of very different lengths go to different groups so little is padded.
Prefills (and prefill chunks, and prefills after a prefix hit) run one request each,
or all in one :class:`PrefillBatch` for the native kernel that reads the cache itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SPLIT_MIN_SAVED_ROWS",
    "BatchPlan",
    "DecodeBatch",
    "DecodeGroup",
    "PrefillBatch",
    "PrefillSeq",
    "build_plan",
    "group_decodes",
]

# A new decode group costs a fixed few hundred microseconds (two gathers, one SDPA
# call, a scatter); one padded key row costs about half a microsecond. Split off a
# group only when it saves at least this many padded rows (see README, bench_attention).
SPLIT_MIN_SAVED_ROWS = 512


@dataclass(frozen=True)
class DecodeGroup:
    """Decode requests attended together in one batched call."""

    tokens: slice | torch.Tensor  # their flat token positions: a run, or [n] int64
    seqs: tuple[int, ...]  # [n] request indices in the batch, ascending
    block_ids: torch.Tensor  # [n * num_blocks] int64: each request's blocks, padded
    num_blocks: int  # blocks per request after padding
    span: int  # keys attended: the longest context in the group
    mask: torch.Tensor | None  # [n, 1, 1, span] bool, True = attend; None if all span long

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)


@dataclass(frozen=True)
class DecodeBatch:
    """Every decode request of the step, unpadded, for a kernel that reads the cache itself."""

    tokens: slice | torch.Tensor  # their flat token positions: a run, or [n] int64
    seqs: tuple[int, ...]  # [n] request indices in the batch, ascending
    block_tables: torch.Tensor  # [n, max_blocks] int32, contiguous
    seq_lens: torch.Tensor  # [n] int32, contiguous
    seq_lens_host: list[int]  # [n] the same, on the host
    block_id_range: tuple[int, int]  # (min, max) of block_tables, checked before C reads


@dataclass(frozen=True)
class PrefillSeq:
    """One request whose query is longer than one token."""

    tokens: slice  # its flat token positions
    seq: int  # request index in the batch
    seq_len: int  # context length after this step, new tokens included
    query_len: int  # new tokens; they are the last query_len of the context
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] int64
    mask: torch.Tensor | None  # [query_len, seq_len] bool, True = attend; None: plain causal

    @property
    def cached_len(self) -> int:
        """Context tokens that were already in the cache before this step."""
        return self.seq_len - self.query_len


@dataclass(frozen=True)
class PrefillBatch:
    """Every request of the step with more than one new token, for a kernel that reads
    the cache itself; their rows of the step's query are each a run."""

    seqs: tuple[int, ...]  # [n] request indices in the batch, ascending
    block_tables: torch.Tensor  # [n, max_blocks] int32, contiguous
    seq_lens: torch.Tensor  # [n] int32: context after this step
    q_starts: torch.Tensor  # [n] int32: each request's first row in the step's tokens
    q_lens: torch.Tensor  # [n] int32: its new tokens
    block_id_range: tuple[int, int]  # (min, max) of block_tables, checked before C reads


@dataclass(frozen=True)
class BatchPlan:
    decodes: tuple[DecodeGroup, ...]  # padded groups (empty when decode_batch is set)
    decode_batch: DecodeBatch | None  # all decodes as one batch, when asked for and any
    prefills: tuple[PrefillSeq, ...]  # empty when prefill_batch is set
    prefill_batch: PrefillBatch | None = None  # all prefills as one batch, when asked for


def group_decodes(
    seq_lens: Sequence[int], min_saved_rows: int = SPLIT_MIN_SAVED_ROWS
) -> list[list[int]]:
    """Indices into ``seq_lens`` grouped so that padding to each group's longest is cheap.

    Longest first; a shorter sequence starts a new group when padding it and every
    shorter one after it to the current group's width would waste ``min_saved_rows``.
    Each group lists its indices in ascending order.
    """
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    groups: list[list[int]] = []
    width = -1
    for pos, i in enumerate(order):
        remaining = len(order) - pos
        if not groups or (width - seq_lens[i]) * remaining >= min_saved_rows:
            groups.append([])
            width = seq_lens[i]
        groups[-1].append(i)
    return [sorted(g) for g in groups]


def _tokens(positions: list[int], device: torch.device) -> slice | torch.Tensor:
    start = positions[0]
    if positions == list(range(start, start + len(positions))):
        return slice(start, start + len(positions))
    return torch.tensor(positions, dtype=torch.int64, device=device)


def build_plan(
    query_lens: Sequence[int],  # [B] new tokens per request
    seq_lens: Sequence[int],  # [B] context length after this step
    block_tables: torch.Tensor,  # [B, max_blocks] int block ids
    block_size: int,
    min_saved_rows: int = SPLIT_MIN_SAVED_ROWS,
    *,
    one_decode_batch: bool = False,  # all decodes in one unpadded DecodeBatch, no groups
    one_prefill_batch: bool = False,  # all prefills in one PrefillBatch, no PrefillSeqs
) -> BatchPlan:
    device = block_tables.device
    starts = [0] * len(query_lens)
    for i in range(1, len(query_lens)):
        starts[i] = starts[i - 1] + query_lens[i - 1]
    decode_seqs = [i for i, q in enumerate(query_lens) if q == 1]
    decode_batch = None
    if one_decode_batch and decode_seqs:
        lens = [seq_lens[i] for i in decode_seqs]
        rows = torch.tensor(decode_seqs, dtype=torch.int64, device=device)
        width = -(-max(lens) // block_size)
        tables = block_tables.index_select(0, rows)[:, :width].to(torch.int32).contiguous()
        decode_batch = DecodeBatch(
            tokens=_tokens([starts[i] for i in decode_seqs], device),
            seqs=tuple(decode_seqs),
            block_tables=tables,
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            seq_lens_host=lens,
            block_id_range=(int(tables.min()), int(tables.max())),
        )
        decode_seqs = []
    decodes = []
    for members in group_decodes([seq_lens[i] for i in decode_seqs], min_saved_rows):
        seqs = [decode_seqs[m] for m in members]
        lens = [seq_lens[i] for i in seqs]
        span = max(lens)
        num_blocks = -(-span // block_size)
        rows = torch.tensor(seqs, dtype=torch.int64, device=device)
        block_ids = block_tables.index_select(0, rows)[:, :num_blocks].reshape(-1).long()
        mask = None
        if min(lens) != span:
            lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
            mask = torch.arange(span, device=device) < lens_t[:, None]
            mask = mask.view(len(seqs), 1, 1, span)
        decodes.append(
            DecodeGroup(
                tokens=_tokens([starts[i] for i in seqs], device),
                seqs=tuple(seqs),
                block_ids=block_ids,
                num_blocks=num_blocks,
                span=span,
                mask=mask,
            )
        )
    prefill_seqs = [i for i, q in enumerate(query_lens) if q > 1]
    if one_prefill_batch and prefill_seqs:
        rows = torch.tensor(prefill_seqs, dtype=torch.int64, device=device)
        width = -(-max(seq_lens[i] for i in prefill_seqs) // block_size)
        tables = block_tables.index_select(0, rows)[:, :width].to(torch.int32).contiguous()

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        # A shorter request's table is read only up to its own length: check those ids.
        used = [tables[k, : -(-seq_lens[i] // block_size)] for k, i in enumerate(prefill_seqs)]
        ids = torch.cat(used)
        prefill_batch = PrefillBatch(
            seqs=tuple(prefill_seqs),
            block_tables=tables,
            seq_lens=ints([seq_lens[i] for i in prefill_seqs]),
            q_starts=ints([starts[i] for i in prefill_seqs]),
            q_lens=ints([query_lens[i] for i in prefill_seqs]),
            block_id_range=(int(ids.min()), int(ids.max())),
        )
        return BatchPlan(
            decodes=tuple(decodes),
            decode_batch=decode_batch,
            prefills=(),
            prefill_batch=prefill_batch,
        )
    prefills = []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        if q_len <= 1:  # decodes are grouped above; a request with no new token has no output
            continue
        mask = None
        if s_len != q_len:
            # query j sits at position s_len - q_len + j and sees keys 0..that position.
            q_pos = torch.arange(s_len - q_len, s_len, device=device)
            mask = torch.arange(s_len, device=device)[None, :] <= q_pos[:, None]
        prefills.append(
            PrefillSeq(
                tokens=slice(starts[i], starts[i] + q_len),
                seq=i,
                seq_len=s_len,
                query_len=q_len,
                block_ids=block_tables[i, : -(-s_len // block_size)].long(),
                mask=mask,
            )
        )
    return BatchPlan(decodes=tuple(decodes), decode_batch=decode_batch, prefills=tuple(prefills))
