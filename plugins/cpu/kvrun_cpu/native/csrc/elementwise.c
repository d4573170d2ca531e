/* The per-token ops around the matmuls: RMS norm (optionally after a residual add),
 * SiLU-and-mul, rotary embedding and the KV-cache write, in float32 or bfloat16.
 *
 * Each follows the rounding of the core's reference op (kvrun.ops.reference) for its
 * dtype; for bfloat16 the arithmetic is float32 and each value the reference rounds
 * is rounded here too. Rows are shared among the workers when there are enough.
 */
#include <math.h>
#include <string.h>

#include "kvrun_cpu.h"

enum { DT_F32 = KV_F32, DT_BF16 = KV_BF16 };


/* Below this many elements one thread does the whole op. */
#define SPLIT_MIN 32768

static int workers_for(int64_t elements, int workers) { return elements < SPLIT_MIN ? 1 : workers; }

/* --- rms_norm / fused_add_rms_norm ------------------------------------------------ */

typedef struct {
    const void *x, *residual, *weight; /* [T, H] (row strides), [T, H] or NULL, [H] */
    int64_t x_row, r_row;
    void *out, *sum; /* [T, H] normed, [T, H] x + residual (when residual) */
    int64_t o_row, s_row, tokens, hidden;
    float eps;
    int dtype;
} norm_args;

/* out = weight * (x * rsqrt(mean(x^2) + eps)), with the reference's rounding for dt. */
KV_INLINE void norm_row(const void *x, const void *weight, void *out, int64_t H, float eps,
                        const int dt)
{
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) {
        const float v = kv_ld(x, i, dt);
        ss += v * v;
    }
    const float inv = 1.f / sqrtf(ss / (float)H + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) kv_st(out, i, kv_ld(weight, i, dt) * kv_rnd(kv_ld(x, i, dt) * inv, dt), dt);
}

void kv_rms_norm_row(const void *x, const void *weight, void *out, int64_t n, float eps, int dt)
{
    if (dt == DT_BF16)
        norm_row(x, weight, out, n, eps, DT_BF16);
    else
        norm_row(x, weight, out, n, eps, DT_F32);
}

KV_INLINE void add_row(const void *x, void *res, int64_t n, const int dt)
{
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) kv_st(res, i, kv_ld(x, i, dt) + kv_ld(res, i, dt), dt);
}

void kv_add_row(const void *x, void *res, int64_t n, int dt)
{
    if (dt == DT_BF16)
        add_row(x, res, n, DT_BF16);
    else
        add_row(x, res, n, DT_F32);
}

KV_INLINE void norm_rows(const norm_args *a, int64_t begin, int64_t end, const int dt)
{
    const int64_t H = a->hidden;
    for (int64_t t = begin; t < end; ++t) {
        void *out = (char *)a->out + t * a->o_row * (dt == DT_BF16 ? 2 : 4);
        const void *src = (const char *)a->x + t * a->x_row * (dt == DT_BF16 ? 2 : 4);
        if (a->residual) { /* sum = x + residual, in the dtype: what the next layer reads */
            void *sum = (char *)a->sum + t * a->s_row * (dt == DT_BF16 ? 2 : 4);
            const void *res = (const char *)a->residual + t * a->r_row * (dt == DT_BF16 ? 2 : 4);
            for (int64_t i = 0; i < H; ++i) kv_st(sum, i, kv_ld(src, i, dt) + kv_ld(res, i, dt), dt);
            src = sum;
        }
        norm_row(src, a->weight, out, H, a->eps, dt);
    }
}

static void norm_task(const void *p, int worker, int workers)
{
    const norm_args *a = p;
    int64_t begin, end;
    kv_split(a->tokens, 1, worker, workers, &begin, &end);
    if (a->dtype == DT_BF16)
        norm_rows(a, begin, end, DT_BF16);
    else
        norm_rows(a, begin, end, DT_F32);
}

void kvrun_rms_norm(const void *x, int64_t x_row, const void *residual, int64_t r_row,
                    const void *weight, void *out, int64_t o_row, void *sum, int64_t s_row,
                    int64_t tokens, int64_t hidden, float eps, int dtype, int workers)
{
    const norm_args a = {x, residual, weight, x_row, r_row, out, sum, o_row, s_row, tokens, hidden, eps, dtype};
    kv_pool_run(norm_task, &a, workers_for(tokens * hidden, workers));
}

/* --- silu_and_mul ------------------------------------------------------------------ */

typedef struct {
    const void *x; /* [T, 2I]: gate | up */
    int64_t x_row;
    void *out; /* [T, I] */
    int64_t o_row, tokens, inter;
    int dtype;
} silu_args;

/* out[i] = silu(gate[i]) * up[i], silu rounded to dt as the reference rounds it. */
KV_INLINE void silu_mul(const void *gate, const void *up, void *out, int64_t n, const int dt)
{
    int64_t i = 0;
#if KV_AVX512
    if (dt == DT_F32)
        for (; i + 16 <= n; i += 16) {
            const __m512 g = _mm512_loadu_ps((const float *)gate + i);
            const __m512 u = _mm512_loadu_ps((const float *)up + i);
            const __m512 e = kv_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            _mm512_storeu_ps((float *)out + i, _mm512_mul_ps(s, u));
        }
    else
        for (; i + 16 <= n; i += 16) {
            const __m512 g = kv_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)gate + i)));
            const __m512 u = kv_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)up + i)));
            const __m512 e = kv_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            /* silu rounded to bf16 first, as the reference's F.silu(gate) * up */
            const __m512 s = kv_bf16x16_to_f32(
                kv_f32x16_to_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e))));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), kv_f32x16_to_bf16(_mm512_mul_ps(s, u)));
        }
#endif
    for (; i < n; ++i) {
        const float g = kv_ld(gate, i, dt);
        kv_st(out, i, kv_rnd(g / (1.f + expf(-g)), dt) * kv_ld(up, i, dt), dt);
    }
}

void kv_silu_mul(const void *gate, const void *up, void *out, int64_t n, int dt)
{
    if (dt == DT_BF16)
        silu_mul(gate, up, out, n, DT_BF16);
    else
        silu_mul(gate, up, out, n, DT_F32);
}

KV_INLINE void silu_rows(const silu_args *a, int64_t begin, int64_t end, const int dt)
{
    const int64_t I = a->inter, es = dt == DT_BF16 ? 2 : 4;
    for (int64_t t = begin; t < end; ++t) {
        const char *x = (const char *)a->x + t * a->x_row * es;
        silu_mul(x, x + I * es, (char *)a->out + t * a->o_row * es, I, dt);
    }
}

static void silu_task(const void *p, int worker, int workers)
{
    const silu_args *a = p;
    int64_t begin, end;
    kv_split(a->tokens, 1, worker, workers, &begin, &end);
    if (a->dtype == DT_BF16)
        silu_rows(a, begin, end, DT_BF16);
    else
        silu_rows(a, begin, end, DT_F32);
}

void kvrun_silu_and_mul(const void *x, int64_t x_row, void *out, int64_t o_row, int64_t tokens,
                        int64_t inter, int dtype, int workers)
{
    const silu_args a = {x, x_row, out, o_row, tokens, inter, dtype};
    kv_pool_run(silu_task, &a, workers_for(tokens * inter, workers));
}

/* --- rotary_embedding (rotate-half) -------------------------------------------------- */

typedef struct {
    const int64_t *positions; /* [T] */
    const void *q, *k;        /* [T, Hq, D], [T, Hk, D]: strides (tok, head), unit last */
    int64_t q_tok, q_head, k_tok, k_head;
    const float *cos_sin; /* [max_pos, D] float32: cos | sin */
    void *out;            /* [T, Hq + Hk, D] contiguous: rotated q heads, then k heads */
    int64_t tokens, num_heads, num_kv_heads, head_dim;
    int dtype;
} rotary_args;

KV_INLINE void rotate_head(const void *x, void *o, const float *cs, int64_t half, const int dt)
{
    for (int64_t i = 0; i < half; ++i) {
        const float c = kv_rnd(cs[i], dt), s = kv_rnd(cs[half + i], dt);
        const float x1 = kv_ld(x, i, dt), x2 = kv_ld(x, half + i, dt);
        kv_st(o, i, kv_rnd(x1 * c, dt) - kv_rnd(x2 * s, dt), dt);
        kv_st(o, half + i, kv_rnd(x2 * c, dt) + kv_rnd(x1 * s, dt), dt);
    }
}

void kv_rotate_head(const void *x, void *out, const float *cos_sin, int64_t half, int dt)
{
    if (dt == DT_BF16)
        rotate_head(x, out, cos_sin, half, DT_BF16);
    else
        rotate_head(x, out, cos_sin, half, DT_F32);
}

KV_INLINE void rotary_rows(const rotary_args *a, int64_t begin, int64_t end, const int dt)
{
    const int64_t D = a->head_dim, half = D / 2, es = dt == DT_BF16 ? 2 : 4;
    const int64_t heads = a->num_heads + a->num_kv_heads;
    for (int64_t t = begin; t < end; ++t) {
        const float *cs = a->cos_sin + a->positions[t] * D;
        char *o = (char *)a->out + t * heads * D * es;
        for (int64_t h = 0; h < a->num_heads; ++h)
            rotate_head((const char *)a->q + (t * a->q_tok + h * a->q_head) * es, o + h * D * es, cs, half, dt);
        for (int64_t h = 0; h < a->num_kv_heads; ++h)
            rotate_head((const char *)a->k + (t * a->k_tok + h * a->k_head) * es,
                        o + (a->num_heads + h) * D * es, cs, half, dt);
    }
}

static void rotary_task(const void *p, int worker, int workers)
{
    const rotary_args *a = p;
    int64_t begin, end;
    kv_split(a->tokens, 1, worker, workers, &begin, &end);
    if (a->dtype == DT_BF16)
        rotary_rows(a, begin, end, DT_BF16);
    else
        rotary_rows(a, begin, end, DT_F32);
}

/* Returns -1, or the index of the first position outside [0, max_pos) and writes nothing. */
int64_t kvrun_rotary(const int64_t *positions, const void *q, int64_t q_tok, int64_t q_head,
                     const void *k, int64_t k_tok, int64_t k_head, const float *cos_sin,
                     int64_t max_pos, void *out, int64_t tokens, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int dtype, int workers)
{
    for (int64_t t = 0; t < tokens; ++t)
        if (positions[t] < 0 || positions[t] >= max_pos) return t;
    const rotary_args a = {positions, q, k, q_tok, q_head, k_tok, k_head, cos_sin, out,
                           tokens, num_heads, num_kv_heads, head_dim, dtype};
    const int64_t elements = tokens * (num_heads + num_kv_heads) * head_dim;
    kv_pool_run(rotary_task, &a, workers_for(elements, workers));
    return -1;
}

/* --- the KV-cache write ---------------------------------------------------------------- */

/* Copy each token's K and V heads into its cache slot (any dtype: rows are copied as
   bytes). Caches are [Hk, num_blocks, block_size, D] through element strides. Returns
   -1, or the index of the first slot outside [0, num_blocks * block_size) and writes
   nothing. */
int64_t kvrun_write_kv(const void *key, int64_t k_tok, int64_t k_head, const void *value,
                    int64_t v_tok, int64_t v_head, void *key_cache, void *value_cache,
                    int64_t c_head, int64_t c_block, int64_t c_slot, const int64_t *slots,
                    int64_t tokens, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                    int64_t num_blocks, int64_t esize)
{
    for (int64_t t = 0; t < tokens; ++t)
        if (slots[t] < 0 || slots[t] >= num_blocks * block_size) return t;
    const size_t row = (size_t)(head_dim * esize);
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t slot = slots[t], blk = slot / block_size, off = slot % block_size;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            const int64_t dst = (h * c_head + blk * c_block + off * c_slot) * esize;
            memcpy((char *)key_cache + dst, (const char *)key + (t * k_tok + h * k_head) * esize, row);
            memcpy((char *)value_cache + dst, (const char *)value + (t * v_tok + h * v_head) * esize, row);
        }
    }
    return -1;
}

/* --- apply_token_bitmask (structured output) ------------------------------------------- */

typedef struct {
    float *logits;          /* [B, row] float32 */
    int64_t row;            /* logits' row stride */
    const int32_t *bitmask; /* [G, words]: bit t % 32 of word t / 32 allows token t */
    int64_t words;
    const int64_t *rows; /* [G] the logits row of each bitmask row (checked by the caller) */
    int64_t count, vocab;
} bitmask_args;

static void bitmask_task(const void *p, int worker, int workers)
{
    const bitmask_args *a = p;
    int64_t begin, end;
    kv_split(a->count, 1, worker, workers, &begin, &end);
    const float neg_inf = -__builtin_inff();
    for (int64_t g = begin; g < end; ++g) {
        float *out = a->logits + a->rows[g] * a->row;
        const int32_t *mask = a->bitmask + g * a->words;
        for (int64_t w = 0; w * 32 < a->vocab; ++w) {
            const uint32_t bits = w < a->words ? (uint32_t)mask[w] : 0u;
            if (bits == 0xFFFFFFFFu)
                continue; /* all 32 allowed */
            const int64_t first = w * 32, last = first + 32 < a->vocab ? first + 32 : a->vocab;
            for (int64_t t = first; t < last; ++t)
                if (!((bits >> (t - first)) & 1u))
                    out[t] = neg_inf;
        }
    }
}

void kvrun_apply_token_bitmask(float *logits, int64_t row, const int32_t *bitmask, int64_t words,
                               const int64_t *rows, int64_t count, int64_t vocab, int workers)
{
    const bitmask_args a = {logits, row, bitmask, words, rows, count, vocab};
    kv_pool_run(bitmask_task, &a, workers_for(count * vocab, workers));
}

/* --- argmax (greedy sampling) ------------------------------------------------------------ */

/* torch.argmax's answer per row: the first index of the row's maximum, where NaN counts
   as larger than any number (the first NaN wins). The vector loop keeps, per lane, the
   first index of that lane's maximum (a later value must be strictly greater to replace
   it); the lanes' maxima are then merged taking the smallest index among equal ones, so
   the result is the first maximal index whatever the lane split. A row with a NaN is
   rescanned for its first NaN. */
typedef struct {
    const float *logits; /* [B, row] float32 */
    int64_t row, rows, vocab;
    int64_t *out; /* [B] */
} argmax_args;

static int64_t argmax_row(const float *x, int64_t n)
{
    int64_t best = 0, i = 0;
    int nan = 0;
#if KV_AVX512
    if (n >= 16) {
        __m512 vmax = _mm512_loadu_ps(x);
        __m512i vidx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m512i cur = vidx;
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 unordered = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
        for (i = 16; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            cur = _mm512_add_epi32(cur, step);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
            unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vmax = _mm512_mask_mov_ps(vmax, gt, v);
            vidx = _mm512_mask_mov_epi32(vidx, gt, cur);
        }
        nan = unordered != 0;
        if (!nan) {
            const float top = _mm512_reduce_max_ps(vmax);
            const __mmask16 at = _mm512_cmp_ps_mask(vmax, _mm512_set1_ps(top), _CMP_EQ_OQ);
            best = _mm512_mask_reduce_min_epi32(at, vidx);
        }
    } else {
        i = 1;
    }
#else
    i = 1;
#endif
    if (!nan) {
        float top = x[best];
        nan = top != top;
        for (; i < n && !nan; ++i) {
            if (x[i] != x[i]) nan = 1;
            else if (x[i] > top) top = x[i], best = i;
        }
    }
    if (nan)
        for (i = 0; i < n; ++i)
            if (x[i] != x[i]) return i;
    return best;
}

static void argmax_task(const void *p, int worker, int workers)
{
    const argmax_args *a = p;
    int64_t begin, end;
    kv_split(a->rows, 1, worker, workers, &begin, &end);
    for (int64_t r = begin; r < end; ++r) a->out[r] = argmax_row(a->logits + r * a->row, a->vocab);
}

void kvrun_argmax(const float *logits, int64_t row, int64_t rows, int64_t vocab, int64_t *out,
                  int workers)
{
    const argmax_args a = {logits, row, rows, vocab, out};
    kv_pool_run(argmax_task, &a, workers_for(rows * vocab, workers));
}
