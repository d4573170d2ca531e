"""kvrun-cpu's native kernels: C built on first use, called through ctypes.

:func:`load_native` builds (or finds in its cache) one shared library from ``csrc/``
and returns :class:`NativeKernels`, whose methods take torch tensors, check what the
C code relies on (it checks nothing), and run the kernel on the threads of torch's
OpenMP runtime. Without a compiler, or if the build fails, there are no native
kernels: the caller gets None and the reason, and the cpu plugin keeps its torch paths.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from kvrun_cpu.native.amx import AMX_ISA, FALLBACK_ISA, init_tiles, log_fallback
from kvrun_cpu.native.build import BuildSettings, compile_library, default_isa, library_path
from kvrun_cpu.native.packed import PANEL, PackedWeight

__all__ = ["DTYPE_CODES", "BuildSettings", "NativeKernels", "PackedWeight", "load_native"]

# The dtypes the packed matmuls take.
_PACKED = (torch.float32, torch.bfloat16)
# The dtype codes of the C sources (DT_* in attention.c and elementwise.c).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_I64, _PTR, _INT, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES: dict[str, list[type]] = {
    # x, x_row, panels, bias, y, y_row, m, n, k, workers
    "kvrun_packed_linear_f32": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT],
    # w, w_row, n, k, panels, workers
    "kvrun_pack_f32": [_PTR, _I64, _I64, _I64, _PTR, _INT],
    # ids, m, panels, n, k, out -> bad id or -1
    "kvrun_packed_rows_f32": [_PTR, _I64, _PTR, _I64, _I64, _PTR],
    # the same three for bfloat16
    "kvrun_packed_linear_bf16": [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT],
    "kvrun_pack_bf16": [_PTR, _I64, _I64, _I64, _PTR, _INT],
    "kvrun_packed_rows_bf16": [_PTR, _I64, _PTR, _I64, _I64, _PTR],
    # x, x_row, panels[groups], offsets[groups + 1], groups, y, y_row, n, k, workers
    "kvrun_grouped_linear_f32": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    "kvrun_grouped_linear_bf16": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    # query, q_tok, q_head, key_cache, value_cache, c_head, c_block, c_slot, tables, t_row,
    # seq_lens, n, num_heads, num_kv_heads, head_dim, block_size, scale, out, o_tok, o_head,
    # dtype, workers
    "kvrun_paged_decode": [
        *(_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I64, _PTR),
        *(_I64, _I64, _I64, _I64, _I64, _FLOAT, _PTR, _I64, _I64, _INT, _INT),
    ],
    # query, q_tok, q_head, key_cache, value_cache, c_head, c_block, c_slot, tables, t_row,
    # seq_lens, q_starts, q_lens, n, num_heads, num_kv_heads, head_dim, block_size, scale,
    # out, o_tok, o_head, dtype, workers -> 0, or -1 out of memory
    "kvrun_paged_prefill": [
        *(_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR),
        *(_I64, _I64, _I64, _I64, _I64, _FLOAT, _PTR, _I64, _I64, _INT, _INT),
    ],
    # x, x_row, residual, r_row, weight, out, o_row, sum, s_row, tokens, hidden, eps, dtype,
    # workers
    "kvrun_rms_norm": [
        *(_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64),
        *(_FLOAT, _INT, _INT),
    ],
    # x, x_row, out, o_row, tokens, inter, dtype, workers
    "kvrun_silu_and_mul": [_PTR, _I64, _PTR, _I64, _I64, _I64, _INT, _INT],
    # logits, row, bitmask, words, rows, count, vocab, workers
    "kvrun_apply_token_bitmask": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _INT],
    # logits, row, rows, vocab, out, workers
    "kvrun_argmax": [_PTR, _I64, _I64, _I64, _PTR, _INT],
    # positions, q, q_tok, q_head, k, k_tok, k_head, cos_sin, max_pos, out, tokens, Hq, Hk, D,
    # dtype, workers -> bad position or -1
    "kvrun_rotary": [
        *(_PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64),
        *(_I64, _I64, _INT, _INT),
    ],
    # key, k_tok, k_head, value, v_tok, v_head, key_cache, value_cache, c_head, c_block, c_slot,
    # slots, tokens, num_kv_heads, head_dim, block_size, num_blocks, esize -> bad slot or -1
    "kvrun_write_kv": [
        *(_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR),
        *(_I64, _I64, _I64, _I64, _I64, _I64),
    ],
    # model, tokens, positions, slots, tables, t_row, seq_lens, lora_slots (or NULL), m,
    # hidden, scratch, where, workers -> 0 or an error code (native.decoder.STEP_ERRORS)
    "kvrun_decode_step": [
        *(_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _INT)
    ],
    # model, m -> floats of scratch
    "kvrun_decode_scratch": [_PTR, _I64],
    # -> 0 (the tiles granted: bf16 matmuls on AMX) or why not (kvrun_cpu.native.amx)
    "kvrun_amx_init": [],
    # quantized GGUF matrices (quant.c, kvrun_cpu.native.quantized): x, x_row, blocks, bits,
    # bias, y, y_row, m, n, k, workers -> 0 or -1 (out of memory)
    "kvrun_quant_linear": [_PTR, _I64, _PTR, _INT, _PTR, _PTR, _I64, _I64, _I64, _I64, _INT],
    # ids, m, blocks, bits, n, k, out -> bad id or -1
    "kvrun_quant_rows": [_PTR, _I64, _PTR, _INT, _I64, _I64, _PTR],
    # -> 1: AVX512-VNNI, 0: the portable C
    "kvrun_quant_isa": [],
    # y, y_row, x, x_row, a, b, scales, slots, tokens, n, k, r, num_slots, out, o_row, dtype,
    # workers -> -1, a token whose slot is out of range, or -2 out of memory (lora.c)
    "kvrun_add_lora": [
        *(_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64),
        *(_PTR, _I64, _INT, _INT),
    ],
}
_RESULTS: dict[str, type] = {
    "kvrun_packed_rows_f32": _I64,
    "kvrun_packed_rows_bf16": _I64,
    "kvrun_write_kv": _I64,
    "kvrun_rotary": _I64,
    "kvrun_decode_step": _I64,
    "kvrun_decode_scratch": _I64,
    "kvrun_amx_init": _INT,
    "kvrun_quant_linear": _INT,
    "kvrun_quant_rows": _I64,
    "kvrun_quant_isa": _INT,
    "kvrun_paged_prefill": _INT,
    "kvrun_add_lora": _I64,
}


class NativeKernels:
    """The loaded library. Each call runs on up to ``threads`` threads (the calling one
    included) of torch's OpenMP runtime; calls from several Python threads each get
    their own team."""

    def __init__(self, library: Path, threads: int, isa: str, note: str | None = None) -> None:
        lib = ctypes.CDLL(str(library))
        self.library = library
        self.threads = max(1, threads)
        self.isa = isa  # the instruction set it was built for (build.supported_isas)
        self.note = note  # why a wider ISA this CPU has is not the one used, or None
        for name, argtypes in _SIGNATURES.items():
            fn = lib[name]
            fn.argtypes = argtypes
            fn.restype = _RESULTS.get(name)
            setattr(self, "_" + name.removeprefix("kvrun_"), fn)
        # The fused decode step is driven by kvrun_cpu.native.decoder.NativeDecoder.
        self.decode_step_fn = self._decode_step  # type: ignore[attr-defined]
        self.decode_scratch_fn = self._decode_scratch  # type: ignore[attr-defined]
        self.amx_init_fn = self._amx_init  # type: ignore[attr-defined]

    # matmul ----------------------------------------------------------------------------
    def pack(self, weight: torch.Tensor) -> PackedWeight:  # [N, K] float32 or bfloat16
        """The weight in the panel layout :meth:`packed_linear` reads (a new tensor)."""
        n, k = weight.shape
        assert weight.dtype in _PACKED and weight.stride(1) == 1
        if weight.dtype == torch.float32:
            shape: tuple[int, ...] = (-(-n // PANEL), k, PANEL)
        else:
            shape = (-(-n // PANEL), -(-k // 2), PANEL, 2)
        panels = torch.empty(shape, dtype=weight.dtype)
        assert panels.data_ptr() % 64 == 0  # the kernels load whole aligned lines
        pack = self._pack_f32 if weight.dtype == torch.float32 else self._pack_bf16  # type: ignore[attr-defined]
        pack(weight.data_ptr(), weight.stride(0), n, k, panels.data_ptr(), self.threads)
        return PackedWeight(panels, n, k)

    def packed_linear(
        self,
        x: torch.Tensor,  # [M, K], the weight's dtype, unit last stride
        weight: PackedWeight,  # [N, K]
        bias: torch.Tensor | None = None,  # [N], the weight's dtype, contiguous
    ) -> torch.Tensor:  # [M, N], the weight's dtype
        """x @ weight.T + bias, summed in float32."""
        m, k = x.shape
        n, dtype = weight.out_features, weight.dtype
        assert weight.in_features == k and x.stride(1) == 1 and x.dtype == dtype
        if bias is not None:
            assert bias.shape == (n,) and bias.dtype == dtype and bias.is_contiguous()
        y = torch.empty((m, n), dtype=dtype)
        fn = self._packed_linear_f32 if dtype == torch.float32 else self._packed_linear_bf16  # type: ignore[attr-defined]
        fn(
            x.data_ptr(),
            x.stride(0),
            weight.panels.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            n,
            m,
            n,
            k,
            self.threads,
        )
        return y

    def grouped_linear(
        self,
        x: torch.Tensor,  # [M, K], the weights' dtype, contiguous: rows grouped
        offsets: torch.Tensor,  # [G + 1] int64: group g is rows offsets[g]..offsets[g+1]
        weights: Sequence[PackedWeight],  # [G], each [N, K]
    ) -> torch.Tensor:  # [M, N]: each group's rows through its own matrix
        """One packed matmul per group in one native call (a mixture of experts)."""
        m, k = x.shape
        n, dtype = weights[0].out_features, weights[0].dtype
        assert len(offsets) == len(weights) + 1 and offsets.dtype == torch.int64
        assert x.is_contiguous() and x.dtype == dtype and offsets.is_contiguous()
        assert all(w.out_features == n and w.in_features == k and w.dtype == dtype for w in weights)
        panels = (ctypes.c_void_p * len(weights))(*(w.panels.data_ptr() for w in weights))
        y = torch.empty((m, n), dtype=dtype)
        fn = self._grouped_linear_f32 if dtype == torch.float32 else self._grouped_linear_bf16  # type: ignore[attr-defined]
        fn(
            x.data_ptr(),
            k,
            panels,
            offsets.data_ptr(),
            len(weights),
            y.data_ptr(),
            n,
            n,
            k,
            self.threads,
        )
        return y

    def packed_rows(self, ids: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
        """Rows ``ids`` ([T] int64) of the packed matrix: [T, K]; an id outside it is an
        IndexError."""
        ids = ids.contiguous()
        assert ids.dtype == torch.int64 and ids.dim() == 1
        out = torch.empty((ids.shape[0], weight.in_features), dtype=weight.dtype)
        fn = self._packed_rows_f32 if weight.dtype == torch.float32 else self._packed_rows_bf16  # type: ignore[attr-defined]
        bad = fn(
            ids.data_ptr(),
            ids.shape[0],
            weight.panels.data_ptr(),
            weight.out_features,
            weight.in_features,
            out.data_ptr(),
        )
        if bad >= 0:
            raise IndexError(
                f"index {int(ids[bad])} is out of range for {weight.out_features} rows"
            )
        return out

    # attention -------------------------------------------------------------------------
    def paged_decode(
        self,
        query: torch.Tensor,  # [n, Hq, D], one token per request; unit last stride
        key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], unit last stride
        value_cache: torch.Tensor,  # same shape and strides as key_cache
        tables: torch.Tensor,  # [n, max_blocks] int32, unit last stride
        seq_lens: torch.Tensor,  # [n] int32 contiguous, each >= 1
        scale: float,
        out: torch.Tensor,  # [n, Hq, D], the query's dtype, unit last stride
    ) -> None:
        """Decode attention of each request's one query over its paged context, into out.

        The caller guarantees every block id in ``tables`` (up to each request's length)
        is inside the cache: the kernel reads them unchecked.
        """
        n, num_heads, head_dim = query.shape
        num_kv_heads, _, block_size, _ = key_cache.shape
        assert key_cache.stride() == value_cache.stride() and key_cache.stride(3) == 1
        assert query.stride(2) == 1 and tables.stride(1) == 1 and seq_lens.is_contiguous()
        assert tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
        assert query.dtype == key_cache.dtype == value_cache.dtype == out.dtype
        assert out.shape == query.shape and out.stride(2) == 1
        assert num_heads % num_kv_heads == 0 and tables.shape[0] == seq_lens.shape[0] == n
        c_head, c_block, c_slot, _ = key_cache.stride()
        self._paged_decode(  # type: ignore[attr-defined]
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            c_head,
            c_block,
            c_slot,
            tables.data_ptr(),
            tables.stride(0),
            seq_lens.data_ptr(),
            n,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            out.data_ptr(),
            out.stride(0),
            out.stride(1),
            DTYPE_CODES[query.dtype],
            self.threads,
        )

    def paged_prefill(
        self,
        query: torch.Tensor,  # [T, Hq, D]: the step's tokens; unit last stride
        key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], unit last stride
        value_cache: torch.Tensor,  # same shape and strides as key_cache
        tables: torch.Tensor,  # [n, max_blocks] int32, unit last stride
        seq_lens: torch.Tensor,  # [n] int32 contiguous: context after this step
        q_starts: torch.Tensor,  # [n] int32 contiguous: each request's first row of query
        q_lens: torch.Tensor,  # [n] int32 contiguous: its new tokens, >= 1, <= seq_len
        scale: float,
        out: torch.Tensor,  # [T, Hq, D], the query's dtype: the requests' rows are written
    ) -> None:
        """Causal attention of each request's new tokens over its paged context (their
        own K/V already written), into out: each query exactly as :meth:`paged_decode`
        attends a request of its position + 1 tokens, so chunking never changes a bit.

        The caller guarantees the rows and every block id (up to each request's length)
        are inside query/out and the cache: the kernel reads them unchecked.
        """
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads, _, block_size, _ = key_cache.shape
        n = seq_lens.shape[0]
        assert key_cache.stride() == value_cache.stride() and key_cache.stride(3) == 1
        assert query.stride(2) == 1 and tables.stride(1) == 1 and seq_lens.is_contiguous()
        assert q_starts.is_contiguous() and q_lens.is_contiguous()
        assert tables.dtype == seq_lens.dtype == q_starts.dtype == q_lens.dtype == torch.int32
        assert query.dtype == key_cache.dtype == value_cache.dtype == out.dtype
        assert out.shape == query.shape and out.stride(2) == 1
        assert num_heads % num_kv_heads == 0
        assert tables.shape[0] == q_starts.shape[0] == q_lens.shape[0] == n
        c_head, c_block, c_slot, _ = key_cache.stride()
        failed = self._paged_prefill(  # type: ignore[attr-defined]
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            c_head,
            c_block,
            c_slot,
            tables.data_ptr(),
            tables.stride(0),
            seq_lens.data_ptr(),
            q_starts.data_ptr(),
            q_lens.data_ptr(),
            n,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            out.data_ptr(),
            out.stride(0),
            out.stride(1),
            DTYPE_CODES[query.dtype],
            self.threads,
        )
        if failed:
            raise MemoryError("paged_prefill: no memory for its work list")

    def write_kv(
        self,
        key: torch.Tensor,  # [T, Hk, D], unit last stride
        value: torch.Tensor,  # [T, Hk, D], unit last stride
        key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], unit last stride
        value_cache: torch.Tensor,  # same shape and strides
        slots: torch.Tensor,  # [T] int64 contiguous, block_id * block_size + offset
    ) -> None:
        """Copy each token's K/V heads into its cache slot; a slot outside the cache is an
        IndexError and nothing is written."""
        tokens, num_kv_heads, head_dim = key.shape
        _, num_blocks, block_size, _ = key_cache.shape
        assert key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
        assert key_cache.stride() == value_cache.stride() and key_cache.stride(3) == 1
        assert key.stride(2) == 1 and value.stride(2) == 1 and value.shape == key.shape
        assert slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (tokens,)
        c_head, c_block, c_slot, _ = key_cache.stride()
        bad = self._write_kv(  # type: ignore[attr-defined]
            key.data_ptr(),
            key.stride(0),
            key.stride(1),
            value.data_ptr(),
            value.stride(0),
            value.stride(1),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            c_head,
            c_block,
            c_slot,
            slots.data_ptr(),
            tokens,
            num_kv_heads,
            head_dim,
            block_size,
            num_blocks,
            key.element_size(),
        )
        if bad >= 0:
            raise IndexError(
                f"slot {int(slots[bad])} of token {bad} is outside the KV cache of "
                f"{num_blocks} blocks of {block_size}"
            )

    # lora ------------------------------------------------------------------------------
    def add_lora(
        self,
        y: torch.Tensor,  # [T, N] float32 or bfloat16, unit last stride
        x: torch.Tensor,  # [T, K] y's dtype, unit last stride
        lora_a: torch.Tensor,  # [S, R, K] y's dtype, contiguous
        lora_b: torch.Tensor,  # [S, N, R] y's dtype, contiguous
        scales: torch.Tensor,  # [S] float32 contiguous
        slots: torch.Tensor,  # [T] int64 contiguous: each token's slot, -1 for none
    ) -> torch.Tensor:  # [T, N]: y + scales[s] * (x @ A_s^T) @ B_s^T per token of slot s
        """Batched LoRA (kvrun.ops.reference.add_lora); a slot outside [-1, S) is an
        IndexError."""
        tokens, n = y.shape
        num_slots, r, k = lora_a.shape
        assert x.shape == (tokens, k) and lora_b.shape == (num_slots, n, r)
        assert y.dtype == x.dtype == lora_a.dtype == lora_b.dtype and y.dtype in _PACKED
        assert y.stride(1) == 1 and x.stride(1) == 1
        assert lora_a.is_contiguous() and lora_b.is_contiguous()
        assert scales.dtype == torch.float32 and scales.is_contiguous()
        assert scales.shape == (num_slots,)
        assert slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (tokens,)
        out = torch.empty((tokens, n), dtype=y.dtype)
        bad = self._add_lora(  # type: ignore[attr-defined]
            y.data_ptr(),
            y.stride(0),
            x.data_ptr(),
            x.stride(0),
            lora_a.data_ptr(),
            lora_b.data_ptr(),
            scales.data_ptr(),
            slots.data_ptr(),
            tokens,
            n,
            k,
            r,
            num_slots,
            out.data_ptr(),
            n,
            DTYPE_CODES[y.dtype],
            self.threads,
        )
        if bad == -2:
            raise MemoryError(f"add_lora: no memory for {tokens} tokens of rank {r}")
        if bad >= 0:
            raise IndexError(
                f"slot {int(slots[bad])} of token {bad} is outside the {num_slots} LoRA slots "
                "(-1 for none)"
            )
        return out

    # elementwise -----------------------------------------------------------------------
    def rms_norm(
        self,
        x: torch.Tensor,  # [T, H] float32 or bfloat16, unit last stride
        weight: torch.Tensor,  # [H] same dtype, contiguous
        eps: float,
        residual: torch.Tensor | None = None,  # [T, H] same dtype, unit last stride
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (normed, x + residual or None)
        """RMS norm of x, or of x + residual (returned too), as the reference rounds."""
        tokens, hidden = x.shape
        assert x.dtype == weight.dtype and x.stride(1) == 1 and weight.is_contiguous()
        assert weight.shape == (hidden,)
        out = torch.empty((tokens, hidden), dtype=x.dtype)
        summed = None
        if residual is not None:
            assert residual.shape == x.shape and residual.dtype == x.dtype
            assert residual.stride(1) == 1
            summed = torch.empty((tokens, hidden), dtype=x.dtype)
        self._rms_norm(  # type: ignore[attr-defined]
            x.data_ptr(),
            x.stride(0),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            weight.data_ptr(),
            out.data_ptr(),
            hidden,
            None if summed is None else summed.data_ptr(),
            hidden,
            tokens,
            hidden,
            eps,
            DTYPE_CODES[x.dtype],
            self.threads,
        )
        return out, summed

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        tokens, width = x.shape
        assert x.stride(1) == 1 and width % 2 == 0
        out = torch.empty((tokens, width // 2), dtype=x.dtype)
        self._silu_and_mul(  # type: ignore[attr-defined]
            x.data_ptr(),
            x.stride(0),
            out.data_ptr(),
            width // 2,
            tokens,
            width // 2,
            DTYPE_CODES[x.dtype],
            self.threads,
        )
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:  # [B, V] float32 -> [B] int64
        """torch.argmax(logits, dim=1): each row's first maximal index, NaN the largest."""
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
        rows, vocab = logits.shape
        assert vocab > 0
        out = torch.empty(rows, dtype=torch.int64)
        self._argmax(  # type: ignore[attr-defined]
            logits.data_ptr(), logits.stride(0), rows, vocab, out.data_ptr(), self.threads
        )
        return out

    def apply_token_bitmask(
        self,
        logits: torch.Tensor,  # [B, V] float32, changed in place
        bitmask: torch.Tensor,  # [G, words] int32
        rows: torch.Tensor,  # [G] int64
    ) -> None:
        assert logits.dtype == torch.float32 and logits.stride(1) == 1
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous()
        rows = rows.to(torch.int64).contiguous()
        assert rows.shape[0] == bitmask.shape[0]
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < logits.shape[0]):
            raise IndexError(f"bitmask rows {rows.tolist()} outside {logits.shape[0]} logits rows")
        self._apply_token_bitmask(  # type: ignore[attr-defined]
            logits.data_ptr(),
            logits.stride(0),
            bitmask.data_ptr(),
            bitmask.shape[1],
            rows.data_ptr(),
            rows.shape[0],
            logits.shape[1],
            self.threads,
        )

    def rotary(
        self,
        positions: torch.Tensor,  # [T] int64 contiguous
        query: torch.Tensor,  # [T, Hq, D], unit last stride
        key: torch.Tensor,  # [T, Hk, D], same dtype, unit last stride
        cos_sin: torch.Tensor,  # [max_pos, D] float32 contiguous
    ) -> torch.Tensor:  # [T, Hq + Hk, D]: rotated query heads, then key heads
        """Rotate-half rotary embedding; a position outside the table is an IndexError."""
        tokens, num_heads, head_dim = query.shape
        num_kv_heads = key.shape[1]
        assert key.shape == (tokens, num_kv_heads, head_dim) and key.dtype == query.dtype
        assert query.stride(2) == 1 and key.stride(2) == 1 and head_dim % 2 == 0
        assert cos_sin.dtype == torch.float32 and cos_sin.is_contiguous()
        assert cos_sin.shape[1] == head_dim
        assert positions.dtype == torch.int64 and positions.is_contiguous()
        assert positions.shape == (tokens,)
        out = torch.empty((tokens, num_heads + num_kv_heads, head_dim), dtype=query.dtype)
        bad = self._rotary(  # type: ignore[attr-defined]
            positions.data_ptr(),
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            key.data_ptr(),
            key.stride(0),
            key.stride(1),
            cos_sin.data_ptr(),
            cos_sin.shape[0],
            out.data_ptr(),
            tokens,
            num_heads,
            num_kv_heads,
            head_dim,
            DTYPE_CODES[query.dtype],
            self.threads,
        )
        if bad >= 0:
            raise IndexError(
                f"position {int(positions[bad])} of token {bad} is outside the rotary table "
                f"of {cos_sin.shape[0]} positions"
            )
        return out


def load_native(
    cache_dir: Path,
    threads: int,
    isa: str | None = None,
    settings: BuildSettings | None = None,
) -> tuple[NativeKernels | None, str]:
    """The native kernels, built once under ``cache_dir``; or None and why not.

    ``threads`` is how many threads one call may use (torch's thread count); ``isa``
    forces a target ("AVX512", "AVX2", "generic"; default: what torch detected);
    ``settings`` are the build variables (default: a Release build, every source at
    once, quiet). A cached library that will not load (truncated, foreign) is rebuilt
    once.
    """
    isa = isa or default_isa()
    settings = settings or BuildSettings()
    native, why = _load(cache_dir, threads, isa, settings)
    if isa != AMX_ISA:
        return native, why
    # The tiles only where the build worked and Linux grants them; else vdpbf16ps.
    refused = why if native is None else init_tiles(native.amx_init_fn)
    if refused is None:
        return native, why
    native, why = _load(cache_dir, threads, FALLBACK_ISA, settings)
    if native is None:  # nothing builds here (no compiler, no cache): that is the reason
        return None, why
    log_fallback(refused)
    native.note = f"{AMX_ISA} unused: {refused}"
    return native, f"{why} ({native.note})"


def _load(
    cache_dir: Path, threads: int, isa: str, settings: BuildSettings
) -> tuple[NativeKernels | None, str]:
    lib, flags = library_path(cache_dir, isa, settings.build_type)
    if lib.exists():
        try:
            return NativeKernels(lib, threads, isa), f"cached {lib}"
        except (OSError, AttributeError):
            lib.unlink(missing_ok=True)
    error = compile_library(lib, flags, settings.jobs, settings.verbose)
    if error is not None:
        return None, error
    try:
        return NativeKernels(lib, threads, isa), f"built {lib}"
    except (OSError, AttributeError) as exc:
        return None, f"could not load {lib}: {exc}"
