"""The XLA model runner: the core's model, one compiled graph per shape bucket.

Same contract as :class:`kvrun.engine.step_runner.StepRunner` (scheduler chunks in,
float32 logits of the sampling rows out, on the host), but every step is padded to a
(tokens, requests) bucket before it reaches the device, so XLA compiles at most one
graph per bucket (two where prompt logprobs ask for every row's logits).
:meth:`XlaModelRunner.warm_up` compiles them all up front; with
``check_recompilation`` a step that compiles after warm-up is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.engine.batch import StepLogits
from kvrun.engine.step_runner import CausalLM
from kvrun.errors import PluginError
from kvrun.scheduling.output import ScheduledChunk
from kvrun_tpu.attention import XlaAttentionMetadata
from kvrun_tpu.buckets import BucketSpec

__all__ = ["PaddedBatch", "XlaModelRunner", "compile_count", "meta_to_device", "pad_batch"]


def compile_count() -> int:
    """Graphs XLA compiled in this process so far (torch_xla's CompileTime metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


def _sync() -> None:
    import torch_xla

    torch_xla.sync()


@dataclass
class PaddedBatch:
    """A step padded to its bucket, on the host; real sizes alongside."""

    input_ids: torch.Tensor  # [Tp] int64, padding 0
    positions: torch.Tensor  # [Tp] int64, padding 0
    meta: XlaAttentionMetadata  # host tensors; the runner moves them to the device
    sample_indices: torch.Tensor  # [Bp] int64 flat index of each sampling row, padding 0
    sample_chunks: list[int]  # [S] chunk index of each sampling row
    query_starts: list[int]  # [B+1] real cumulative query lengths


def pad_batch(
    chunks: Sequence[ScheduledChunk],
    buckets: BucketSpec,
    num_blocks: int,
    shape: tuple[int, int] | None = None,
) -> PaddedBatch:
    """Flatten and pad the chunks to their bucket (or to ``shape``, (tokens, requests)).

    Padding tokens write to the sink block ``num_blocks``.
    """
    bs = buckets.block_size
    num_tokens = sum(len(c.token_ids) for c in chunks)
    tp, bp = shape or buckets.pad(num_tokens, len(chunks))
    assert num_tokens <= tp and len(chunks) <= bp, f"{num_tokens} tokens do not fit {tp, bp}"
    width = buckets.max_blocks_per_seq
    ids, pos, slots, seq_of = [], [], [], []
    starts, seq_lens, query_lens, samples, sample_chunks = [0], [], [], [], []
    tables = [[0] * width for _ in range(bp)]
    for i, chunk in enumerate(chunks):
        n, start = len(chunk.token_ids), chunk.start_position
        assert len(chunk.block_ids) <= width, "a block table is wider than max_model_len"
        tables[i][: len(chunk.block_ids)] = chunk.block_ids
        ids += chunk.token_ids
        pos += range(start, start + n)
        slots += (chunk.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
        seq_of += [i] * n
        starts.append(starts[-1] + n)
        seq_lens.append(start + n)
        query_lens.append(n)
        if chunk.samples:
            samples.append(starts[-1] - 1)
            sample_chunks.append(i)
    pad = tp - num_tokens
    sink = num_blocks * bs
    meta = XlaAttentionMetadata(
        num_tokens=num_tokens,
        slot_mapping=torch.tensor(slots + [sink + j % bs for j in range(pad)]),
        query_start_loc=torch.tensor(starts + [num_tokens] * (bp - len(chunks)), dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens + [0] * (bp - len(chunks)), dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        query_lens=query_lens,
        seq_lens_host=seq_lens,
        block_size=bs,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        token_seq=torch.tensor(seq_of + [0] * pad),
        token_pos=torch.tensor(pos + [0] * pad),
        num_seqs_device=torch.tensor([len(chunks)], dtype=torch.int32),
    )
    return PaddedBatch(
        input_ids=torch.tensor(ids + [0] * pad),
        positions=meta.token_pos,
        meta=meta,
        sample_indices=torch.tensor(samples + [0] * (bp - len(samples))),
        sample_chunks=sample_chunks,
        query_starts=starts,
    )


def meta_to_device(meta: XlaAttentionMetadata, device: torch.device) -> XlaAttentionMetadata:
    """A copy of ``meta`` with its tensors on ``device`` (host fields shared)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    return XlaAttentionMetadata(
        num_tokens=meta.num_tokens,
        slot_mapping=move(meta.slot_mapping),
        query_start_loc=move(meta.query_start_loc),
        seq_lens=move(meta.seq_lens),
        block_tables=move(meta.block_tables),
        query_lens=meta.query_lens,
        seq_lens_host=meta.seq_lens_host,
        block_size=meta.block_size,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        token_seq=move(meta.token_seq),
        token_pos=move(meta.token_pos),
        num_seqs_device=move(meta.num_seqs_device),
    )


class XlaModelRunner:
    """Runs the core's model through XLA over the paged KV cache, padded to buckets.

    Invariants: the KV cache tensors have ``num_blocks + 1`` blocks (the last is the
    padding sink); every device input of a step has its bucket's shape, so the compiled
    graph depends only on the bucket and on whether prompt logits were asked for.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        buckets: BucketSpec,
        num_blocks: int,
        device: torch.device,
        check_recompilation: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = buckets
        self.num_blocks = num_blocks
        self.device = device
        self.check_recompilation = check_recompilation
        self._warm = False
        # Materialise weights and caches now, so their set-up is not part of a step graph.
        _sync()

    def execute(
        self, chunks: Sequence[ScheduledChunk], prompt_logits_for: frozenset[str] = frozenset()
    ) -> StepLogits:
        """Run one step; ``prompt_logits_for`` names requests whose chunk needs all logits."""
        return self._run(chunks, prompt_logits_for, None)

    def execute_flat(
        self,
        input_ids: torch.Tensor,  # [T] int64: the chunks' tokens back to back
        meta: AttentionMetadata,  # the core's (unpadded) metadata of this step
        rows: list[int],  # [N] flat token rows that need logits
    ) -> torch.Tensor:  # [N, V] float32 logits, on the host
        """A step as the core's ``build_batch`` lays it out (the ModelExecutor contract)."""
        ids = input_ids.cpu().tolist()
        starts = meta.query_start_loc.cpu().tolist()
        tables = meta.block_tables.cpu().tolist()
        bs = self.buckets.block_size
        chunks = [
            ScheduledChunk(
                request_id=str(i),
                token_ids=ids[starts[i] : starts[i + 1]],
                start_position=seq_len - q_len,
                block_ids=tables[i][: -(-seq_len // bs)],
                samples=False,
                is_prefill=q_len > 1,
            )
            for i, (seq_len, q_len) in enumerate(zip(meta.seq_lens_host, meta.query_lens))
        ]
        return self._logits(pad_batch(chunks, self.buckets, self.num_blocks), rows)

    def _run(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str],
        shape: tuple[int, int] | None,
    ) -> StepLogits:
        batch = pad_batch(chunks, self.buckets, self.num_blocks, shape)
        num_samples = len(batch.sample_chunks)
        rows: list[int] = batch.sample_indices[:num_samples].tolist()
        spans: dict[str, tuple[int, int]] = {}
        starts = batch.query_starts
        for i, chunk in enumerate(chunks):
            if chunk.request_id in prompt_logits_for:
                spans[chunk.request_id] = (len(rows), len(rows) + starts[i + 1] - starts[i])
                rows += range(starts[i], starts[i + 1])
        logits = self._logits(batch, rows)
        return StepLogits(
            logits=logits[:num_samples],
            request_ids=[chunks[i].request_id for i in batch.sample_chunks],
            prompt_logits={rid: logits[a:b] for rid, (a, b) in spans.items()},
        )

    @torch.no_grad()
    def _logits(self, batch: PaddedBatch, rows: list[int]) -> torch.Tensor:
        """Run the padded step; float32 logits of the flat ``rows``, on the host."""
        before = compile_count()
        meta = meta_to_device(batch.meta, self.device)
        hidden = self.model.forward(
            batch.input_ids.to(self.device), meta.token_pos, self.kv_caches, meta
        )
        tp, bp = batch.meta.slot_mapping.shape[0], batch.meta.block_tables.shape[0]
        if len(rows) <= bp:  # the sampling graph: one padded row per request
            index = torch.tensor(rows + [0] * (bp - len(rows)), dtype=torch.int64)
            picked = self.model.compute_logits(hidden.index_select(0, index.to(self.device)))
            _sync()  # runs the step and commits the cache writes
            logits = picked.cpu()[: len(rows)]
        else:  # prompt logprobs: every row's logits, a second graph per bucket
            every = self.model.compute_logits(hidden)  # [Tp, V]
            _sync()
            logits = every.cpu().index_select(0, torch.tensor(rows, dtype=torch.int64))
        if self._warm and self.check_recompilation and compile_count() != before:
            raise PluginError(
                f"VLLM_XLA_CHECK_RECOMPILATION: a step of {batch.meta.num_tokens} tokens and "
                f"{batch.meta.num_seqs} requests (bucket {tp} tokens x {bp} requests) compiled "
                f"{compile_count() - before} new graph(s) after warm-up"
            )
        return logits

    def warm_up(self) -> int:
        """Compile the sampling graph of every bucket; returns the graphs compiled
        (one per bucket, plus the first step's one-off graph).

        Dummy steps write only to the sink block, so the cache is unchanged.
        """
        before = compile_count()
        sink = self.num_blocks
        shapes = self.buckets.shapes()
        # The first step also materialises state the model set up lazily (one more graph
        # output), so its graph differs from every later step of the same shape.
        for shape in [shapes[0], *shapes]:
            # The graph depends only on the padded shape: one token per request will do.
            chunks = [
                ScheduledChunk(f"warm-up-{i}", [0], 0, [sink], samples=True, is_prefill=True)
                for i in range(shape[1])
            ]
            self._run(chunks, frozenset(), shape)
        self._warm = True
        return compile_count() - before
