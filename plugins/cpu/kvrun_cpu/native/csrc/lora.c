/* Batched LoRA (the add_lora op): out = y + scale_s * (x A_s^T) B_s^T for each token t of
 * slot s, out = y for the tokens of no slot (-1), in float32 or bfloat16.
 *
 * The tokens are grouped by slot (a counting sort), then two passes over the pool:
 *  - shrink: buf[j, p] = x[t] . A_s[j] for each token t at grouped position p, float32
 *    (rounded to bfloat16 for bfloat16, as the reference's first F.linear rounds);
 *  - expand: the output columns shared among the workers; each slot's tokens in chunks
 *    of 16 (one vector of lanes), 4 rows of B at a time, out[t, n] = y[t, n] + scale *
 *    sum_j B_s[n, j] buf[j, p]. Columns of B that are zero in all 4 rows are skipped (a
 *    bit mask of the nonzero ones on AVX-512, a compare per entry in the portable C): the
 *    merged projections (qkv, gate_up) keep each part's rank block in its own columns,
 *    and ranks below max_lora_rank are zero-padded, so most of a row is zero.
 * The rounding of bfloat16 follows the reference: the expansion, then the scale, then the
 * sum, each rounded to the dtype. Float32 sums run in a different order from torch's
 * matmul, so results agree within float rounding, not bit for bit.
 *
 * The fused decode step (decoder.c) calls the same passes (kv_lora_group, kv_lora_shrink,
 * kv_lora_expand in place) inside its own phases. Every output element's arithmetic is
 * the same whichever tokens and columns a call covers, so its projections are bit for bit
 * those of this op.
 */
#include <stdlib.h>
#include <string.h>

#include "kvrun_cpu.h"

enum { DT_F32 = KV_F32, DT_BF16 = KV_BF16 };
enum { CHUNK = 16 }; /* tokens per vector in the expansion */

typedef kv_lora_args lora_args;

/* x . w over k, float32 sums. */
KV_INLINE float dot(const void *x, const void *w, int64_t k, const int dt)
{
    int64_t i = 0;
    float s = 0.f;
#if KV_AVX512
    __m512 acc = _mm512_setzero_ps();
    if (dt == DT_F32)
        for (; i + 16 <= k; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps((const float *)x + i),
                                  _mm512_loadu_ps((const float *)w + i), acc);
    else
        for (; i + 16 <= k; i += 16)
            acc = _mm512_fmadd_ps(
                kv_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i))),
                kv_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i))),
                acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < k; ++i) s += kv_ld(x, i, dt) * kv_ld(w, i, dt);
    return s;
}

#if KV_AVX512
/* Up to SHRINK_TOKENS consecutive grouped positions of one slot at a time: each 16 values
   of a row of A are loaded (and widened from bfloat16) once for all of them. Each token's
   sums are those of dot() (the same multiply-adds in the same order, the same final
   reduction), so the grouping never changes a bit. */
enum { SHRINK_TOKENS = 4 };

KV_INLINE __m512 load16(const void *p, int64_t i, const int dt)
{
    return dt == DT_F32 ? _mm512_loadu_ps((const float *)p + i)
                        : kv_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}

KV_INLINE void shrink(const lora_args *a, int64_t begin, int64_t end, const int dt)
{
    const int64_t es = dt == DT_BF16 ? 2 : 4, K = a->k, R = a->r, T = a->tokens;
    for (int64_t p = begin; p < end;) {
        const int64_t s = a->slots[a->order[p]];
        int64_t g = 1;
        while (g < SHRINK_TOKENS && p + g < end && a->slots[a->order[p + g]] == s) ++g;
        const char *x[SHRINK_TOKENS];
        for (int64_t q = 0; q < g; ++q) x[q] = (const char *)a->x + a->order[p + q] * a->x_row * es;
        const char *w = (const char *)a->a + s * R * K * es;
        for (int64_t j = 0; j < R; ++j) {
            const char *wj = w + j * K * es;
            __m512 acc[SHRINK_TOKENS];
            for (int q = 0; q < SHRINK_TOKENS; ++q) acc[q] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= K; i += 16) {
                const __m512 wv = load16(wj, i, dt);
                for (int q = 0; q < SHRINK_TOKENS; ++q)
                    if (q < g) acc[q] = _mm512_fmadd_ps(load16(x[q], i, dt), wv, acc[q]);
            }
            for (int64_t q = 0; q < g; ++q) {
                float sum = _mm512_reduce_add_ps(acc[q]);
                for (int64_t ii = i; ii < K; ++ii) sum += kv_ld(x[q], ii, dt) * kv_ld(wj, ii, dt);
                a->buf[j * T + p + q] = kv_rnd(sum, dt);
            }
        }
        p += g;
    }
}
#else
KV_INLINE void shrink(const lora_args *a, int64_t begin, int64_t end, const int dt)
{
    const int64_t es = dt == DT_BF16 ? 2 : 4, K = a->k, R = a->r, T = a->tokens;
    for (int64_t p = begin; p < end; ++p) {
        const int64_t t = a->order[p], s = a->slots[t];
        const char *x = (const char *)a->x + t * a->x_row * es;
        const char *w = (const char *)a->a + s * R * K * es;
        for (int64_t j = 0; j < R; ++j) a->buf[j * T + p] = kv_rnd(dot(x, w + j * K * es, K, dt), dt);
    }
}

#endif

void kv_lora_shrink(const kv_lora_args *a, int64_t p_begin, int64_t p_end)
{
    if (a->dtype == DT_BF16)
        shrink(a, p_begin, p_end, DT_BF16);
    else
        shrink(a, p_begin, p_end, DT_F32);
}

static void shrink_task(const void *p, int worker, int workers)
{
    const lora_args *a = p;
    int64_t begin, end;
    kv_split(a->starts[a->num_slots], 1, worker, workers, &begin, &end);
    kv_lora_shrink(a, begin, end);
}

/* ROWS rows of B at a time: their accumulators are independent (no chain of dependent
   multiply-adds), and one load of buf serves all of them. */
enum { ROWS = 4 };

#if KV_AVX512
/* Bit j of the result: any of the `rows` rows of B (row stride R) is nonzero at column
   j0 + j, for j < 64 and j0 + j < R. */
KV_INLINE uint64_t nonzero_columns(const void *b, int64_t R, int64_t rows, int64_t j0, const int dt)
{
    uint64_t bits = 0;
    const int64_t width = R - j0 < 64 ? R - j0 : 64;
    for (int64_t q = 0; q < rows; ++q)
        for (int64_t j = 0; j < width; j += 16) {
            const __mmask16 m = width - j >= 16 ? (__mmask16)0xffff : kv_tail_mask(width - j);
            __mmask16 nz;
            if (dt == DT_BF16) {
                const __m256i v = _mm256_maskz_loadu_epi16(m, (const uint16_t *)b + q * R + j0 + j);
                nz = _mm256_test_epi16_mask(v, v);
            } else {
                const __m512i v = _mm512_maskz_loadu_epi32(m, (const float *)b + q * R + j0 + j);
                nz = _mm512_test_epi32_mask(v, v);
            }
            bits |= (uint64_t)nz << j;
        }
    return bits;
}

/* acc[q * 16 + i] = sum_j B[c + q, j] buf[j * T + p0 + i] for the rows q < rows (<= ROWS)
   and the cnt (<= 16) tokens at p0; only the columns where some row is nonzero. */
KV_INLINE void expand_rows(const void *brow, const float *buf, int64_t T, int64_t R, int64_t p0,
                           int64_t cnt, int64_t rows, float *acc, const int dt)
{
    const __mmask16 mask = cnt >= CHUNK ? (__mmask16)0xffff : kv_tail_mask(cnt);
    __m512 v[ROWS];
    for (int q = 0; q < ROWS; ++q) v[q] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < R; j0 += 64) {
        uint64_t bits = nonzero_columns(brow, R, rows, j0, dt);
        while (bits) {
            const int64_t j = j0 + __builtin_ctzll(bits);
            bits &= bits - 1;
            const __m512 col = _mm512_maskz_loadu_ps(mask, buf + j * T + p0);
            for (int q = 0; q < ROWS; ++q)
                if (q < rows) v[q] = _mm512_fmadd_ps(_mm512_set1_ps(kv_ld(brow, q * R + j, dt)), col, v[q]);
        }
    }
    for (int q = 0; q < ROWS; ++q) _mm512_storeu_ps(acc + q * CHUNK, v[q]);
}
#else
KV_INLINE void expand_rows(const void *brow, const float *buf, int64_t T, int64_t R, int64_t p0,
                           int64_t cnt, int64_t rows, float *acc, const int dt)
{
    for (int64_t i = 0; i < ROWS * CHUNK; ++i) acc[i] = 0.f;
    for (int64_t q = 0; q < rows; ++q)
        for (int64_t j = 0; j < R; ++j) {
            const float b = kv_ld(brow, q * R + j, dt);
            if (b == 0.f) continue;
            const float *col = buf + j * T + p0;
            float *out = acc + q * CHUNK;
#pragma omp simd
            for (int64_t i = 0; i < cnt; ++i) out[i] += b * col[i];
        }
}
#endif

#if KV_AVX512
/* The AVX-512 expansion, column blocks of 16 along N: each block's 16 rows of B are turned
   once per slot into R column vectors bt[j] (lane i = B[c + i, j]); then for each token of
   the slot, acc = sum_j bt[j] * buf[j, p] over the nonzero columns in j order, and the
   block's outputs are written as one vector. Each output element sees the same multiply-adds
   in the same order as the row-wise form below (a zero B entry adds an exact zero), so the
   two give the same bits; this one writes whole vectors instead of one element at a time. */
KV_INLINE void expand(const lora_args *a, int64_t n0, int64_t n1, const int dt)
{
    const int64_t es = dt == DT_BF16 ? 2 : 4, N = a->n, R = a->r, T = a->tokens;
    float rows[16 * R], bt[R * 16];
    int64_t nz[R];
    const __m512i row_index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)R));
    for (int64_t s = 0; s < a->num_slots; ++s) {
        if (a->starts[s] == a->starts[s + 1]) continue;
        const __m512 scale = _mm512_set1_ps(a->scales[s]);
        const char *bs = (const char *)a->b + s * N * R * es;
        for (int64_t c = n0; c < n1; c += 16) {
            const int64_t cols = n1 - c < 16 ? n1 - c : 16;
            const __mmask16 m = cols >= 16 ? (__mmask16)0xffff : kv_tail_mask(cols);
            for (int64_t i = 0; i < 16; ++i) /* B's rows c .. c + 15 as float32, zeros past n1 */
                for (int64_t j = 0; j < R; ++j) rows[i * R + j] = i < cols ? kv_ld(bs, (c + i) * R + j, dt) : 0.f;
            int64_t count = 0;
            for (int64_t j = 0; j < R; ++j) {
                const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(row_index, _mm512_set1_epi32((int)j)), rows, 4);
                _mm512_storeu_ps(bt + j * 16, v);
                if (_mm512_test_epi32_mask(_mm512_castps_si512(v), _mm512_castps_si512(v))) nz[count++] = j;
            }
            for (int64_t p = a->starts[s]; p < a->starts[s + 1]; ++p) {
                const int64_t t = a->order[p];
                __m512 acc = _mm512_setzero_ps();
                for (int64_t q = 0; q < count; ++q) {
                    const int64_t j = nz[q];
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(bt + j * 16), _mm512_set1_ps(a->buf[j * T + p]), acc);
                }
                const char *y = (const char *)a->y + (t * a->y_row + c) * es;
                char *o = (char *)a->out + (t * a->o_row + c) * es;
                if (dt == DT_BF16) {
                    const __m512 d = kv_bf16x16_to_f32(kv_f32x16_to_bf16(
                        _mm512_mul_ps(kv_bf16x16_to_f32(kv_f32x16_to_bf16(acc)), scale)));
                    const __m512 yv = kv_bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, y));
                    _mm256_mask_storeu_epi16(o, m, kv_f32x16_to_bf16(_mm512_add_ps(yv, d)));
                } else {
                    const __m512 yv = _mm512_maskz_loadu_ps(m, y);
                    _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(acc, scale, yv));
                }
            }
        }
    }
    if (a->y == a->out && a->y_row == a->o_row) return; /* in place: nothing to copy */
    for (int64_t p = a->starts[a->num_slots]; p < T; ++p) { /* no adapter: y as it is */
        const int64_t t = a->order[p];
        memcpy((char *)a->out + (t * a->o_row + n0) * es, (const char *)a->y + (t * a->y_row + n0) * es,
               (size_t)((n1 - n0) * es));
    }
}
#else
KV_INLINE void expand(const lora_args *a, int64_t n0, int64_t n1, const int dt)
{
    const int64_t es = dt == DT_BF16 ? 2 : 4, N = a->n, R = a->r, T = a->tokens;
    float acc[ROWS * CHUNK];
    for (int64_t s = 0; s < a->num_slots; ++s) {
        const float scale = a->scales[s];
        const char *bs = (const char *)a->b + s * N * R * es;
        for (int64_t p0 = a->starts[s]; p0 < a->starts[s + 1]; p0 += CHUNK) {
            const int64_t cnt = a->starts[s + 1] - p0 < CHUNK ? a->starts[s + 1] - p0 : CHUNK;
            for (int64_t c = n0; c < n1; c += ROWS) {
                const int64_t rows = n1 - c < ROWS ? n1 - c : ROWS;
                expand_rows(bs + c * R * es, a->buf, T, R, p0, cnt, rows, acc, dt);
                for (int64_t i = 0; i < cnt; ++i) {
                    const int64_t t = a->order[p0 + i];
                    const char *y = (const char *)a->y + t * a->y_row * es;
                    char *o = (char *)a->out + t * a->o_row * es;
                    for (int64_t q = 0; q < rows; ++q)
                        kv_st(o, c + q, kv_ld(y, c + q, dt) + kv_rnd(kv_rnd(acc[q * CHUNK + i], dt) * scale, dt), dt);
                }
            }
        }
    }
    if (a->y == a->out && a->y_row == a->o_row) return; /* in place: nothing to copy */
    for (int64_t p = a->starts[a->num_slots]; p < T; ++p) { /* no adapter: y as it is */
        const int64_t t = a->order[p];
        memcpy((char *)a->out + (t * a->o_row + n0) * es, (const char *)a->y + (t * a->y_row + n0) * es,
               (size_t)((n1 - n0) * es));
    }
}

#endif

void kv_lora_expand(const kv_lora_args *a, int64_t n0, int64_t n1)
{
    if (n0 >= n1) return;
    if (a->dtype == DT_BF16)
        expand(a, n0, n1, DT_BF16);
    else
        expand(a, n0, n1, DT_F32);
}

static void expand_task(const void *p, int worker, int workers)
{
    const lora_args *a = p;
    int64_t begin, end;
    kv_split(a->n, 16, worker, workers, &begin, &end);
    kv_lora_expand(a, begin, end);
}

void kv_lora_group(const int64_t *slots, int64_t tokens, int64_t num_slots, int64_t *order,
                   int64_t *starts)
{
    memset(starts, 0, (size_t)(num_slots + 2) * sizeof(int64_t));
    for (int64_t t = 0; t < tokens; ++t) ++starts[(slots[t] < 0 ? num_slots : slots[t]) + 1];
    for (int64_t s = 0; s <= num_slots; ++s) starts[s + 1] += starts[s];
    /* Fill by a moving cursor per group, then shift the cursors back into starts. */
    for (int64_t t = 0; t < tokens; ++t) order[starts[slots[t] < 0 ? num_slots : slots[t]]++] = t;
    for (int64_t s = num_slots; s > 0; --s) starts[s] = starts[s - 1];
    starts[0] = 0;
}

/* Below this many multiply-adds one thread does the whole op. */
#define SPLIT_MIN (1 << 20)

/* out = y + per-token LoRA (above). Returns -1, the first token whose slot is outside
   [-1, num_slots) (nothing written), or -2 when out of memory. */
int64_t kvrun_add_lora(const void *y, int64_t y_row, const void *x, int64_t x_row, const void *a,
                       const void *b, const float *scales, const int64_t *slots, int64_t tokens,
                       int64_t n, int64_t k, int64_t r, int64_t num_slots, void *out, int64_t o_row,
                       int dtype, int workers)
{
    for (int64_t t = 0; t < tokens; ++t)
        if (slots[t] < -1 || slots[t] >= num_slots) return t;
    int64_t *order = malloc((size_t)(tokens + num_slots + 2) * sizeof(int64_t));
    float *buf = malloc((size_t)(r * tokens + 1) * sizeof(float));
    if (!order || !buf) {
        free(order);
        free(buf);
        return -2;
    }
    int64_t *starts = order + tokens; /* [num_slots + 2]: the no-slot group is num_slots */
    kv_lora_group(slots, tokens, num_slots, order, starts);
    const lora_args args = {y,      x,      a,     b,     y_row, x_row, scales,    slots, order,
                            starts, buf,    out,   o_row, tokens, n,    k,         r,     num_slots,
                            dtype};
    const int64_t adapted = starts[num_slots];
    const int w = adapted * r * (k + n) < SPLIT_MIN && tokens * n < SPLIT_MIN ? 1 : workers;
    if (adapted > 0) kv_pool_run(shrink_task, &args, adapted >= w ? w : (int)adapted);
    kv_pool_run(expand_task, &args, w);
    free(order);
    free(buf);
    return -1;
}
