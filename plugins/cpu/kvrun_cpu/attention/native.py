"""A small C kernel for decode attention straight from the paged cache (fp32).

Why C, and why not torch.utils.cpp_extension: decode attention is memory bound, and
the torch path gathers each request's blocks into a buffer before SDPA reads them,
so every K/V byte crosses memory three times; this kernel walks the block table and
reads each cached row once. It includes no torch headers and is called through
ctypes, so it builds in well under a second with the system C compiler (a
cpp_extension build takes about a minute on the 2-core target) and is cached by a
hash of its source, flags and the CPU's ISA. Without a compiler, or if the build
fails, :func:`load_decode_kernel` returns None with the reason and the backend keeps
its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvrun_cpu.attention.plan import DecodeBatch

__all__ = ["DecodeKernel", "decode_batch", "load_decode_kernel"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* One (request, kv head) item: the group of query heads that share kv head h attend
   to the request's len cached rows. Always inlined so that a constant head_dim
   unrolls the inner loops. */
static inline __attribute__((always_inline)) void decode_item(
    const float *restrict q, int64_t q_head, const float *restrict kh,
    const float *restrict vh, int64_t c_block, int64_t c_slot, const int32_t *restrict table,
    int64_t len, int64_t group, const int64_t head_dim, int64_t block_size, float scale,
    float *restrict out, int64_t o_head, float *restrict scores, float *restrict acc)
{
    const int64_t num_blocks = (len + block_size - 1) / block_size;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const float *kb = kh + (int64_t)table[b] * c_block;
        /* Blocks sit at random addresses, beyond the hardware prefetcher's reach. */
        const float *next = b + 1 < num_blocks ? kh + (int64_t)table[b + 1] * c_block : kb;
        const int64_t t0 = b * block_size;
        const int64_t rows = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t i = 0; i < rows; ++i) {
            const float *k = kb + i * c_slot;
            for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(next + i * c_slot + d);
            for (int64_t g = 0; g < group; ++g) {
                const float *qg = q + g * q_head;
                float dot = 0.f;
                #pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * k[d];
                scores[g * len + t0 + i] = dot * scale;
            }
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float *s = scores + g * len;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < len; ++t) mx = s[t] > mx ? s[t] : mx;
        #pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) { s[t] = expf(s[t] - mx); sum += s[t]; }
        const float inv = 1.f / sum;
        #pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
        float *a = acc + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] = 0.f;
    }
    for (int64_t b = 0; b < num_blocks; ++b) {
        const float *vb = vh + (int64_t)table[b] * c_block;
        const float *next = b + 1 < num_blocks ? vh + (int64_t)table[b + 1] * c_block : vb;
        const int64_t t0 = b * block_size;
        const int64_t rows = len - t0 < block_size ? len - t0 : block_size;
        for (int64_t i = 0; i < rows; ++i) {
            const float *v = vb + i * c_slot;
            for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(next + i * c_slot + d);
            for (int64_t g = 0; g < group; ++g) {
                const float p = scores[g * len + t0 + i];
                float *a = acc + g * head_dim;
                #pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
            }
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float *o = out + g * o_head;
        const float *a = acc + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = a[d];
    }
}

/* Decode attention of one query token per request over a paged cache, for the
   (request, kv head) items [begin, end) with item = request * num_kv_heads + head.
   Strides are in elements; the last dimension of query, caches and out is contiguous.
   scratch holds group * max_seq_len + group * head_dim floats. */
void kvrun_paged_decode_f32(
    const float *query, int64_t q_tok, int64_t q_head,
    const float *key_cache, const float *value_cache,
    int64_t c_head, int64_t c_block, int64_t c_slot,
    const int32_t *tables, int64_t t_row, const int32_t *seq_lens,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, float *out, int64_t o_tok, int64_t o_head, float *scratch,
    int64_t begin, int64_t end)
{
    const int64_t group = num_heads / num_kv_heads;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / num_kv_heads, h = item % num_kv_heads;
        const int64_t len = seq_lens[r];
        const float *q = query + r * q_tok + h * group * q_head;
        const float *kh = key_cache + h * c_head, *vh = value_cache + h * c_head;
        const int32_t *table = tables + r * t_row;
        float *o = out + r * o_tok + h * group * o_head;
        float *scores = scratch, *acc = scratch + group * len;
        switch (head_dim) {  /* the common sizes, unrolled */
        case 64:
            decode_item(q, q_head, kh, vh, c_block, c_slot, table, len, group, 64,
                        block_size, scale, o, o_head, scores, acc);
            break;
        case 128:
            decode_item(q, q_head, kh, vh, c_block, c_slot, table, len, group, 128,
                        block_size, scale, o, o_head, scores, acc);
            break;
        default:
            decode_item(q, q_head, kh, vh, c_block, c_slot, table, len, group, head_dim,
                        block_size, scale, o, o_head, scores, acc);
        }
    }
}
"""

_FUNCTION = "kvrun_paged_decode_f32"
_BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-std=c99")
# Work below this many (request, kv head, context token) triples runs on the calling
# thread: splitting it costs more in thread hand-off than it saves.
_SPLIT_MIN_WORK = 1 << 15


def _isa_flags() -> tuple[str, ...]:
    """Target the ISA torch detected, never -march=native: a cache dir may be shared."""
    isa = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and isa in ("AVX2", "AVX512"):
        return ("-mavx2", "-mfma")
    return ()


def _library_path(cache_dir: Path) -> tuple[Path, tuple[str, ...]]:
    """Where the library for this source, these flags and this ISA lives, and the flags."""
    flags = (*_BASE_FLAGS, *_isa_flags())
    isa = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha256("\0".join((_SOURCE, *flags, isa)).encode()).hexdigest()[:16]
    return cache_dir / f"kvrun_cpu_decode_{digest}.so", flags


def _compile(lib: Path, flags: tuple[str, ...]) -> str | None:
    """Build ``lib``; None on success, else why it failed."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            src = Path(tmp) / "decode.c"
            src.write_text(_SOURCE)
            tmp_lib = Path(tmp) / lib.name
            proc = subprocess.run(
                [compiler, *flags, "-o", str(tmp_lib), str(src), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-3:]
                return f"{compiler} failed: {' | '.join(tail)}"
            os.replace(tmp_lib, lib)  # atomic: a concurrent builder sees all or nothing
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not build in {lib.parent}: {exc}"
    return None


def _split(seq_lens: list[int], num_kv_heads: int, workers: int) -> list[int]:
    """Item boundaries giving each worker about the same number of context tokens."""
    total = sum(seq_lens) * num_kv_heads
    bounds, done, item = [0], 0, 0
    for w in range(1, workers):
        while done < total * w // workers:
            done += seq_lens[item // num_kv_heads]
            item += 1
        bounds.append(item)
    bounds.append(len(seq_lens) * num_kv_heads)
    return bounds


class DecodeKernel:
    """The loaded kernel. The platform shares one between its backend and its paged_attention
    op; calls must not overlap (they reuse per-worker scratch buffers)."""

    def __init__(self, library: Path, threads: int) -> None:
        fn = ctypes.CDLL(str(library))[_FUNCTION]
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr]
        fn.argtypes += [i64, i64, i64, i64, ctypes.c_float, ptr, i64, i64, ptr, i64, i64]
        fn.restype = None
        self._fn = fn
        self.threads = max(1, threads)
        # ctypes drops the GIL during the call, so plain threads run the C code in parallel.
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self._scratch: list[torch.Tensor] = []

    def _scratch_for(self, worker: int, numel: int) -> torch.Tensor:
        while len(self._scratch) <= worker:
            self._scratch.append(torch.empty(0, dtype=torch.float32))
        if self._scratch[worker].numel() < numel:
            self._scratch[worker] = torch.empty(numel, dtype=torch.float32)
        return self._scratch[worker]

    def __call__(
        self,
        query: torch.Tensor,  # [n, Hq, D] fp32, one token per request; unit last stride
        key_cache: torch.Tensor,  # [..] fp32 cache viewed as [Hk, num_blocks, block_size, D]
        value_cache: torch.Tensor,  # same shape and strides as key_cache
        tables: torch.Tensor,  # [n, max_blocks] int32, unit last stride
        seq_lens: torch.Tensor,  # [n] int32 contiguous
        seq_lens_host: list[int],  # [n] the same lengths, to share the work out evenly
        scale: float,
        out: torch.Tensor | None = None,  # [n, Hq, D] fp32 with a unit last stride
    ) -> torch.Tensor:  # out, or a new [n, Hq, D] fp32
        n, num_heads, head_dim = query.shape
        num_kv_heads, _, block_size, _ = key_cache.shape
        assert key_cache.stride() == value_cache.stride() and key_cache.stride(3) == 1
        assert query.stride(2) == 1 and tables.stride(1) == 1 and seq_lens.is_contiguous()
        assert tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
        assert query.dtype == key_cache.dtype == value_cache.dtype == torch.float32
        if out is None:
            out = torch.empty((n, num_heads, head_dim), dtype=torch.float32)
        assert out.shape == query.shape and out.dtype == torch.float32 and out.stride(2) == 1
        group = num_heads // num_kv_heads
        scratch_numel = group * (max(seq_lens_host) + head_dim)
        c_head, c_block, c_slot, _ = key_cache.stride()
        fixed = (
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
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            out.data_ptr(),
            out.stride(0),
            out.stride(1),
        )
        items = n * num_kv_heads
        work = sum(seq_lens_host) * num_kv_heads
        workers = min(self.threads if work >= _SPLIT_MIN_WORK else 1, items)
        bounds = _split(seq_lens_host, num_kv_heads, workers)
        scratch = [self._scratch_for(w, scratch_numel).data_ptr() for w in range(workers)]
        futures = [
            self._pool.submit(self._fn, *fixed, scratch[w], bounds[w], bounds[w + 1])
            for w in range(1, workers)
            if self._pool is not None
        ]
        self._fn(*fixed, scratch[0], bounds[0], bounds[1])
        for future in futures:
            future.result()
        return out


def load_decode_kernel(cache_dir: Path, threads: int) -> tuple[DecodeKernel | None, str]:
    """The decode kernel, built once under ``cache_dir``; or None and why not.

    ``threads`` is how many threads one call may use (torch's thread count). A cached
    library that will not load (truncated, foreign) is rebuilt once.
    """
    lib, flags = _library_path(cache_dir)
    if lib.exists():
        try:
            return DecodeKernel(lib, threads), f"cached {lib}"
        except (OSError, AttributeError):
            lib.unlink(missing_ok=True)
    error = _compile(lib, flags)
    if error is not None:
        return None, error
    try:
        return DecodeKernel(lib, threads), f"built {lib}"
    except (OSError, AttributeError) as exc:
        return None, f"could not load {lib}: {exc}"


def decode_batch(
    kernel: DecodeKernel,
    query: torch.Tensor,  # [T, Hq, D] fp32: the step's new tokens, all requests
    key_cache: torch.Tensor,  # viewed as [Hk, num_blocks, block_size, D], any strides
    value_cache: torch.Tensor,  # same shape and strides
    batch: DecodeBatch,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D] fp32: the decode rows are written, the rest untouched
) -> None:
    low, high = batch.block_id_range
    # C does no bounds checks: a bad block id must fail here, not read stray memory.
    assert low >= 0 and high < key_cache.shape[1], (batch.block_id_range, key_cache.shape)
    args = (batch.block_tables, batch.seq_lens, batch.seq_lens_host, scale)
    tokens = batch.tokens
    if isinstance(tokens, slice):  # the kernel writes straight into out's rows
        kernel(query[tokens], key_cache, value_cache, *args, out=out[tokens])
    else:
        result = kernel(query.index_select(0, tokens), key_cache, value_cache, *args)
        out.index_copy_(0, tokens, result)
