/* Decode attention straight from the paged KV cache: one query token per request.
 *
 * Each (request, kv head) item walks the request's block table and reads every cached
 * K/V row exactly once, in place: no gather, no padding. The query heads that share
 * the kv head (grouped-query attention) are served in the same pass over its rows.
 * Scores, then a softmax, then the weighted sum of V, all in float32; the cache and
 * the query/output may be float32, bfloat16 or float16 (DT_* below; all one dtype).
 * Items are shared among the workers by context length.
 *
 * Prefill attention (kvrun_paged_prefill) runs every query of a prompt chunk through
 * the same per-query code as decode, with the query's own position as its context
 * length: a query's result is a function of its row, its position and the cache as
 * stored, never of the chunk it arrived in, the requests beside it, or the worker
 * that took it. Every score is a dot product of fixed order (one vector per 16 lanes
 * of D, then one fixed tree of horizontal adds, whether its row is one of four or on
 * its own); the softmax runs over the whole row from position 0; V is summed in
 * position order. A prompt computed whole, in chunks, behind a prefix-cache hit, or
 * token by token therefore gets the same bits (in bfloat16 too).
 */
#include <math.h>
#include <stdlib.h>

#include "kvrun_cpu.h"

enum { DT_F32 = KV_F32, DT_BF16 = KV_BF16, DT_F16 = KV_F16 };
typedef kv_decode_args decode_args;

/* Per-thread scratch, grown on demand and kept for the thread's life. */
static __thread float *scratch;
static __thread int64_t scratch_len;

static float *scratch_for(int64_t len)
{
    if (len > scratch_len) {
        free(scratch);
        scratch = malloc((size_t)len * sizeof(float));
        scratch_len = scratch ? len : 0;
    }
    return scratch;
}

KV_INLINE float load1(const void *p, int64_t i, const int dt)
{
    if (dt == DT_BF16) return kv_bf16_to_f32(((const uint16_t *)p)[i]);
#if defined(__F16C__)
    if (dt == DT_F16) return _cvtsh_ss(((const uint16_t *)p)[i]);
#else
    if (dt == DT_F16) return (float)((const _Float16 *)p)[i];
#endif
    return ((const float *)p)[i];
}

KV_INLINE void store1(void *p, int64_t i, float v, const int dt)
{
    if (dt == DT_BF16) ((uint16_t *)p)[i] = kv_f32_to_bf16(v);
#if defined(__F16C__)
    else if (dt == DT_F16) ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    else if (dt == DT_F16) ((_Float16 *)p)[i] = (_Float16)v;
#endif
    else ((float *)p)[i] = v;
}

#if KV_AVX512
KV_INLINE __m512 load16(const void *p, int64_t i, const int dt)
{
    if (dt == DT_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (dt == DT_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

/* rows x D values of a 16-bit cache block (row stride `stride` bytes) widened into
   float32 `out` [rows, D], so the heads that read the block do not each widen it. */
KV_INLINE void widen_rows(const char *block, int64_t stride, int64_t rows, int64_t D, float *out,
                          const int dt)
{
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < D / 16; ++c)
            _mm512_storeu_ps(out + i * D + 16 * c, load16(block + i * stride, 16 * c, dt));
}

/* The horizontal sums of four vectors, in one vector. */
KV_INLINE __m128 sum4(const __m512 v[4])
{
    __m256 h[4];
    for (int i = 0; i < 4; ++i)
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm512_extractf32x8_ps(v[i], 1));
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

/* The portable paths' dot product and V update, one out-of-line copy per dtype: every
   caller gets the same instructions, so the same bits (a reduction's vector order is
   the compiler's choice, made once here). */
#define KV_GENERIC_PIECES(NAME, DT)                                                         \
    __attribute__((noinline)) static float dot_##NAME(const float *q, const void *k,       \
                                                       int64_t D)                          \
    {                                                                                      \
        float sum = 0.f;                                                                   \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t d = 0; d < D; ++d) sum +=      \
            q[d] * load1(k, d, DT);                                                        \
        return sum;                                                                        \
    }                                                                                      \
    __attribute__((noinline)) static void axpy_##NAME(float *acc, float p, const void *v,  \
                                                      int64_t D)                           \
    {                                                                                      \
        _Pragma("omp simd") for (int64_t d = 0; d < D; ++d) acc[d] += p * load1(v, d, DT); \
    }
KV_GENERIC_PIECES(f32, DT_F32)
KV_GENERIC_PIECES(bf16, DT_BF16)
KV_GENERIC_PIECES(f16, DT_F16)

KV_INLINE float dot_generic(const float *q, const void *k, int64_t D, const int dt)
{
    return dt == DT_BF16 ? dot_bf16(q, k, D) : dt == DT_F16 ? dot_f16(q, k, D) : dot_f32(q, k, D);
}

KV_INLINE void axpy_generic(float *acc, float p, const void *v, int64_t D, const int dt)
{
    if (dt == DT_BF16) axpy_bf16(acc, p, v, D);
    else if (dt == DT_F16) axpy_f16(acc, p, v, D);
    else axpy_f32(acc, p, v, D);
}

#if KV_AVX512
/* s[i] = scale * (q . row i) for `rows` float32 rows at `krows` (row stride `kstride`
   bytes), D a multiple of 16: four rows share one horizontal sum, and a row summed
   alone takes the same tree (lane 0 of sum4), so its bits do not depend on its place. */
KV_INLINE void scores16(const float *q, const char *krows, int64_t kstride, int64_t rows,
                        float scale, float *s, const int64_t D)
{
    __m512 qv[16];
    for (int64_t c = 0; c < D / 16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    const __m128 vscale = _mm_set1_ps(scale);
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
        __m512 part[4];
        for (int r4 = 0; r4 < 4; ++r4) {
            const float *k = (const float *)(krows + (i + r4) * kstride);
            part[r4] = _mm512_mul_ps(_mm512_loadu_ps(k), qv[0]);
            for (int64_t c = 1; c < D / 16; ++c)
                part[r4] = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], part[r4]);
        }
        _mm_storeu_ps(s + i, _mm_mul_ps(sum4(part), vscale));
    }
    for (; i < rows; ++i) {
        const float *k = (const float *)(krows + i * kstride);
        __m512 part[4] = {_mm512_mul_ps(_mm512_loadu_ps(k), qv[0]), _mm512_setzero_ps(),
                          _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 1; c < D / 16; ++c)
            part[0] = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], part[0]);
        s[i] = _mm_cvtss_f32(_mm_mul_ps(sum4(part), vscale));
    }
}
#endif

/* s[0..len) <- softmax(s[0..len)), in one fixed order from position 0. */
KV_INLINE void softmax_row(float *s, int64_t len)
{
    float mx = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < len; ++t) mx = s[t] > mx ? s[t] : mx;
    int64_t t = 0;
#if KV_AVX512
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (; t + 16 <= len; t += 16) {
        __m512 e = kv_exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmx));
        _mm512_storeu_ps(s + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (t < len) {
        const __mmask16 m = kv_tail_mask(len - t);
        __m512 e = kv_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vmx));
        _mm512_mask_storeu_ps(s + t, m, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        t = len;
    }
    sum = _mm512_reduce_add_ps(vsum);
#endif
    for (; t < len; ++t) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    const float inv = 1.f / sum;
    for (t = 0; t < len; ++t) s[t] *= inv;
}

/* One query token's heads [h*G, (h+1)*G) (its row `qrow`, written to `orow`) against
   the first `len` rows of the context whose blocks `table` lists, in kv head h. Decode
   and prefill both run every query through here: its bits depend on nothing else. */
KV_INLINE void attend(const decode_args *a, const void *qrow, void *orow, const int32_t *table,
                      int64_t len, int64_t h, const int64_t D, const int dt)
{
    const int64_t bs = a->block_size, G = a->num_heads / a->num_kv_heads;
    const int64_t num_blocks = (len + bs - 1) / bs;
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const char *kh = (const char *)a->key_cache + h * a->c_head * esize;
    const char *vh = (const char *)a->value_cache + h * a->c_head * esize;
    float *q = scratch_for(G * (len + 2 * D) + bs * D);
    if (!q) abort(); /* out of memory: nothing sane to return */
    float *acc = q + G * D, *scores = acc + G * D;
    float *rows32 = scores + G * len; /* one block's rows widened to float32 */
    (void)rows32;                      /* read by the AVX-512 paths only */
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
            q[g * D + d] = load1(qrow, (h * G + g) * a->q_head + d, dt);

    /* scores[g][t] = scale * q_g . k_t */
#if KV_AVX512
    if (D % 16 == 0 && D <= 256) {
        for (int64_t b = 0; b < num_blocks; ++b) {
            const char *kb = kh + (int64_t)table[b] * a->c_block * esize;
            const int64_t t0 = b * bs, rows = len - t0 < bs ? len - t0 : bs;
            if (b + 1 < num_blocks) { /* blocks sit at random addresses: fetch the next */
                const char *next = kh + (int64_t)table[b + 1] * a->c_block * esize;
                for (int64_t i = 0; i < bs; ++i)
                    for (int64_t d = 0; d < D * esize; d += 64)
                        __builtin_prefetch(next + i * a->c_slot * esize + d);
            }
            /* Head by head over the block (in L1 after the first): q_g stays in registers
               and four rows share one horizontal sum. 16-bit rows are widened once, not
               once per head. */
            const char *krows = kb;
            int64_t kstride = a->c_slot * esize;
            if (dt != DT_F32) {
                widen_rows(kb, kstride, rows, D, rows32, dt);
                krows = (const char *)rows32;
                kstride = D * 4;
            }
            for (int64_t g = 0; g < G; ++g)
                scores16(q + g * D, krows, kstride, rows, a->scale, scores + g * len + t0, D);
        }
    } else
#endif
        for (int64_t b = 0; b < num_blocks; ++b) {
            const char *kb = kh + (int64_t)table[b] * a->c_block * esize;
            const int64_t t0 = b * bs, rows = len - t0 < bs ? len - t0 : bs;
            for (int64_t i = 0; i < rows; ++i) {
                const void *k = kb + i * a->c_slot * esize;
                for (int64_t g = 0; g < G; ++g) {
                    const float *qg = q + g * D;
                    scores[g * len + t0 + i] = dot_generic(qg, k, D, dt) * a->scale;
                }
            }
        }

    /* softmax over each head's scores */
    for (int64_t g = 0; g < G; ++g) {
        softmax_row(scores + g * len, len);
        for (int64_t d = 0; d < D; ++d) acc[g * D + d] = 0.f;
    }

    /* acc_g = sum_t p_g[t] v_t */
#if KV_AVX512
    if (D % 16 == 0 && D <= 256 && dt != DT_F32) {
        /* 16-bit V: each block's rows widened once, then every head over them. */
        for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
        for (int64_t b = 0; b < num_blocks; ++b) {
            const char *vb = vh + (int64_t)table[b] * a->c_block * esize;
            const int64_t t0 = b * bs, rows = len - t0 < bs ? len - t0 : bs;
            if (b + 1 < num_blocks) {
                const char *next = vh + (int64_t)table[b + 1] * a->c_block * esize;
                for (int64_t i = 0; i < bs; ++i)
                    for (int64_t d = 0; d < D * esize; d += 64)
                        __builtin_prefetch(next + i * a->c_slot * esize + d);
            }
            widen_rows(vb, a->c_slot * esize, rows, D, rows32, dt);
            for (int64_t g = 0; g < G; ++g) {
                __m512 av[16];
                for (int64_t c = 0; c < D / 16; ++c) av[c] = _mm512_loadu_ps(acc + g * D + 16 * c);
                const float *pg = scores + g * len + t0;
                for (int64_t i = 0; i < rows; ++i) {
                    const __m512 p = _mm512_set1_ps(pg[i]);
                    for (int64_t c = 0; c < D / 16; ++c)
                        av[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(rows32 + i * D + 16 * c), av[c]);
                }
                for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, av[c]);
            }
        }
    } else if (D % 16 == 0 && D <= 256) {
        /* Head by head, acc_g in registers; V is read from memory once (the first head,
           which also prefetches the next block) and from L2 after. */
        for (int64_t g = 0; g < G; ++g) {
            __m512 av[16];
            for (int64_t c = 0; c < D / 16; ++c) av[c] = _mm512_setzero_ps();
            for (int64_t b = 0; b < num_blocks; ++b) {
                const char *vb = vh + (int64_t)table[b] * a->c_block * esize;
                const int64_t t0 = b * bs, rows = len - t0 < bs ? len - t0 : bs;
                if (g == 0 && b + 1 < num_blocks) {
                    const char *next = vh + (int64_t)table[b + 1] * a->c_block * esize;
                    for (int64_t i = 0; i < bs; ++i)
                        for (int64_t d = 0; d < D * esize; d += 64)
                            __builtin_prefetch(next + i * a->c_slot * esize + d);
                }
                const float *pg = scores + g * len + t0;
                for (int64_t i = 0; i < rows; ++i) {
                    const void *v = vb + i * a->c_slot * esize;
                    const __m512 p = _mm512_set1_ps(pg[i]);
                    for (int64_t c = 0; c < D / 16; ++c)
                        av[c] = _mm512_fmadd_ps(p, load16(v, 16 * c, dt), av[c]);
                }
            }
            for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + g * D + 16 * c, av[c]);
        }
    } else
#endif
        for (int64_t b = 0; b < num_blocks; ++b) {
            const char *vb = vh + (int64_t)table[b] * a->c_block * esize;
            const int64_t t0 = b * bs, rows = len - t0 < bs ? len - t0 : bs;
            for (int64_t i = 0; i < rows; ++i) {
                const void *v = vb + i * a->c_slot * esize;
                for (int64_t g = 0; g < G; ++g) {
                    axpy_generic(acc + g * D, scores[g * len + t0 + i], v, D, dt);
                }
            }
        }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
            store1(orow, (h * G + g) * a->o_head + d, acc[g * D + d], dt);
}

/* One decode item: query heads [h*G, (h+1)*G) of request r against its cached rows. */
KV_INLINE void decode_item(const decode_args *a, int64_t r, int64_t h, const int64_t D,
                           const int dt)
{
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    attend(a, (const char *)a->query + r * a->q_tok * esize,
           (char *)a->out + r * a->o_tok * esize, a->tables + r * a->t_row, a->seq_lens[r], h, D,
           dt);
}

KV_INLINE void decode_items(const decode_args *a, int64_t begin, int64_t end, const int dt)
{
    for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / a->num_kv_heads, h = item % a->num_kv_heads;
        switch (a->head_dim) { /* the common sizes, unrolled */
        case 64: decode_item(a, r, h, 64, dt); break;
        case 128: decode_item(a, r, h, 128, dt); break;
        default: decode_item(a, r, h, a->head_dim, dt);
        }
    }
}

void kv_decode_item(const decode_args *a, int64_t r, int64_t h)
{
    switch (a->dtype) {
    case DT_BF16: decode_items(a, r * a->num_kv_heads + h, r * a->num_kv_heads + h + 1, DT_BF16); break;
    case DT_F16: decode_items(a, r * a->num_kv_heads + h, r * a->num_kv_heads + h + 1, DT_F16); break;
    default: decode_items(a, r * a->num_kv_heads + h, r * a->num_kv_heads + h + 1, DT_F32);
    }
}

/* Item bounds giving each worker about the same number of context rows. */
void kv_decode_range(const decode_args *a, int worker, int workers, int64_t *begin, int64_t *end)
{
    int64_t total = 0;
    for (int64_t r = 0; r < a->n; ++r) total += a->seq_lens[r];
    total *= a->num_kv_heads;
    const int64_t items = a->n * a->num_kv_heads;
    int64_t done = 0, item = 0, bounds[2] = {0, items};
    for (int w = 1; w <= worker + 1 && w < workers; ++w) {
        while (item < items && done < total * w / workers) done += a->seq_lens[item++ / a->num_kv_heads];
        if (w == worker) bounds[0] = item;
        if (w == worker + 1) bounds[1] = item;
    }
    *begin = bounds[0];
    *end = bounds[1];
}

static void decode_task(const void *p, int worker, int workers)
{
    const decode_args *a = p;
    int64_t begin, end;
    kv_decode_range(a, worker, workers, &begin, &end);
    switch (a->dtype) {
    case DT_BF16: decode_items(a, begin, end, DT_BF16); break;
    case DT_F16: decode_items(a, begin, end, DT_F16); break;
    default: decode_items(a, begin, end, DT_F32);
    }
}

void kvrun_paged_decode(const void *query, int64_t q_tok, int64_t q_head, const void *key_cache,
                        const void *value_cache, int64_t c_head, int64_t c_block,
                        int64_t c_slot, const int32_t *tables, int64_t t_row,
                        const int32_t *seq_lens, int64_t n, int64_t num_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                        void *out, int64_t o_tok, int64_t o_head, int dtype, int workers)
{
    const decode_args a = {query,   q_tok,   q_head,     key_cache, value_cache, c_head,
                           c_block, c_slot,  tables,     t_row,     seq_lens,    n,
                           num_heads, num_kv_heads, head_dim, block_size, scale, out,
                           o_tok,   o_head,  dtype};
    int64_t rows = 0;
    for (int64_t r = 0; r < n; ++r) rows += seq_lens[r];
    /* Below this many (kv head, context row) pairs a hand-off costs more than it saves. */
    if (rows * num_kv_heads < (1 << 12)) workers = 1;
    if (workers > n * num_kv_heads) workers = (int)(n * num_kv_heads);
    kv_pool_run(decode_task, &a, workers);
}

/* --- prefill: every query of each request's chunk, as decode would attend it --- */

/* Queries of one request that one item takes: it also holds the key rows they share. */
enum { PREFILL_TILE = 16 };

typedef struct {
    decode_args a;           /* tables, seq_lens (after this step), n: the requests */
    const int32_t *q_starts; /* [n] the first query (and output) row of each request */
    const int32_t *q_lens;   /* [n] its new tokens: the last q_lens[r] of its context */
    const int64_t *costs;    /* [items + 1] running sum of each item's work */
    int64_t items;
} prefill_args;

/* Item i: request r, kv head h, queries [j0, j1) of r's chunk (r-major, then h). */
static void prefill_item_bounds(const prefill_args *p, int64_t item, int64_t *r, int64_t *h,
                                int64_t *j0, int64_t *j1)
{
    const int64_t Hk = p->a.num_kv_heads;
    int64_t rr = 0;
    for (;; ++rr) {
        const int64_t tiles = (p->q_lens[rr] + PREFILL_TILE - 1) / PREFILL_TILE;
        if (item < tiles * Hk) {
            *r = rr;
            *h = item / tiles;
            *j0 = (item % tiles) * PREFILL_TILE;
            *j1 = *j0 + PREFILL_TILE < p->q_lens[rr] ? *j0 + PREFILL_TILE : p->q_lens[rr];
            return;
        }
        item -= tiles * Hk;
    }
}

#if KV_AVX512
/* Queries [j0, j1) of request r in kv head h, as attend() computes each of them (the
   same scores16, softmax_row and position-ordered V sums, so the same bits), with the
   context's K/V rows widened to float32 once for the whole tile instead of once per
   query, and each V row read once for all G heads. */
KV_INLINE void prefill_tile16(const decode_args *a, const int32_t *q_starts, int64_t r, int64_t h,
                              int64_t cached, int64_t j0, int64_t j1, const int64_t D,
                              const int dt)
{
    const int64_t bs = a->block_size, G = a->num_heads / a->num_kv_heads;
    const int64_t esize = dt == DT_F32 ? 4 : 2, ctx = cached + j1;
    const int32_t *table = a->tables + r * a->t_row;
    float *kf = scratch_for(2 * ctx * D + G * D + G * ctx);
    if (!kf) abort(); /* out of memory: nothing sane to return */
    float *vf = kf + ctx * D, *q = vf + ctx * D, *scores = q + G * D;
    const char *kh = (const char *)a->key_cache + h * a->c_head * esize;
    const char *vh = (const char *)a->value_cache + h * a->c_head * esize;
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t rows = ctx - t0 < bs ? ctx - t0 : bs;
        const int64_t block = (int64_t)table[t0 / bs] * a->c_block * esize;
        widen_rows(kh + block, a->c_slot * esize, rows, D, kf + t0 * D, dt);
        widen_rows(vh + block, a->c_slot * esize, rows, D, vf + t0 * D, dt);
    }
    for (int64_t j = j0; j < j1; ++j) {
        const int64_t len = cached + j + 1, row = q_starts[r] + j;
        const void *qrow = (const char *)a->query + row * a->q_tok * esize;
        void *orow = (char *)a->out + row * a->o_tok * esize;
        for (int64_t g = 0; g < G; ++g) {
            for (int64_t d = 0; d < D; ++d) q[g * D + d] = load1(qrow, (h * G + g) * a->q_head + d, dt);
            scores16(q + g * D, (const char *)kf, D * 4, len, a->scale, scores + g * len, D);
            softmax_row(scores + g * len, len);
        }
        int64_t g0 = 0;
        if (G * (D / 16) <= 24) { /* every head's sums in registers, V rows read once */
            __m512 av[24];
            for (int64_t i = 0; i < G * (D / 16); ++i) av[i] = _mm512_setzero_ps();
            for (int64_t t = 0; t < len; ++t) {
                __m512 v[16];
                for (int64_t c = 0; c < D / 16; ++c) v[c] = _mm512_loadu_ps(vf + t * D + 16 * c);
                for (int64_t g = 0; g < G; ++g) {
                    const __m512 pr = _mm512_set1_ps(scores[g * len + t]);
                    for (int64_t c = 0; c < D / 16; ++c)
                        av[g * (D / 16) + c] = _mm512_fmadd_ps(pr, v[c], av[g * (D / 16) + c]);
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                float acc[256];
                for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + 16 * c, av[g * (D / 16) + c]);
                for (int64_t d = 0; d < D; ++d) store1(orow, (h * G + g) * a->o_head + d, acc[d], dt);
            }
            g0 = G;
        }
        for (int64_t g = g0; g < G; ++g) { /* many heads per kv head: one at a time */
            __m512 av[16];
            for (int64_t c = 0; c < D / 16; ++c) av[c] = _mm512_setzero_ps();
            for (int64_t t = 0; t < len; ++t) {
                const __m512 pr = _mm512_set1_ps(scores[g * len + t]);
                for (int64_t c = 0; c < D / 16; ++c)
                    av[c] = _mm512_fmadd_ps(pr, _mm512_loadu_ps(vf + t * D + 16 * c), av[c]);
            }
            float acc[256];
            for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + 16 * c, av[c]);
            for (int64_t d = 0; d < D; ++d) store1(orow, (h * G + g) * a->o_head + d, acc[d], dt);
        }
    }
}
#endif

KV_INLINE void prefill_range(const prefill_args *p, int64_t begin, int64_t end, const int64_t D,
                             const int dt)
{
    const decode_args *a = &p->a;
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    for (int64_t item = begin; item < end; ++item) {
        int64_t r, h, j0, j1;
        prefill_item_bounds(p, item, &r, &h, &j0, &j1);
        const int64_t cached = a->seq_lens[r] - p->q_lens[r];
        const int32_t *table = a->tables + r * a->t_row;
#if KV_AVX512
        if (D % 16 == 0 && D <= 256) {
            prefill_tile16(a, p->q_starts, r, h, cached, j0, j1, D, dt);
            continue;
        }
#endif
        for (int64_t j = j0; j < j1; ++j) {
            const int64_t row = p->q_starts[r] + j;
            attend(a, (const char *)a->query + row * a->q_tok * esize,
                   (char *)a->out + row * a->o_tok * esize, table, cached + j + 1, h, D, dt);
        }
    }
}

static void prefill_task(const void *args, int worker, int workers)
{
    const prefill_args *p = args;
    /* Equal shares of the work (query rows x context rows), cut at item boundaries. */
    const int64_t total = p->costs[p->items];
    int64_t begin = 0, end = 0;
    while (begin < p->items && p->costs[begin] < total * worker / workers) ++begin;
    end = begin;
    while (end < p->items && p->costs[end] < total * (worker + 1) / workers) ++end;
    if (worker == workers - 1) end = p->items;
    const int dt = p->a.dtype;
    const int64_t D = p->a.head_dim;
#define PREFILL_CASE(DT)                                                                    \
    if (D == 64) prefill_range(p, begin, end, 64, DT);                                      \
    else if (D == 128) prefill_range(p, begin, end, 128, DT);                               \
    else prefill_range(p, begin, end, D, DT);
    if (dt == DT_BF16) {
        PREFILL_CASE(DT_BF16)
    } else if (dt == DT_F16) {
        PREFILL_CASE(DT_F16)
    } else {
        PREFILL_CASE(DT_F32)
    }
#undef PREFILL_CASE
}

/* Causal attention of n requests' new tokens (request r: rows q_starts[r] .. + q_lens[r]
   of query and out, the last q_lens[r] positions of its seq_lens[r]-long context) over
   the paged cache, which already holds those tokens' K/V. Returns 0, or -1 where
   memory for the work list ran out (nothing written). */
int kvrun_paged_prefill(const void *query, int64_t q_tok, int64_t q_head, const void *key_cache,
                        const void *value_cache, int64_t c_head, int64_t c_block, int64_t c_slot,
                        const int32_t *tables, int64_t t_row, const int32_t *seq_lens,
                        const int32_t *q_starts, const int32_t *q_lens, int64_t n,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                        int64_t block_size, float scale, void *out, int64_t o_tok,
                        int64_t o_head, int dtype, int workers)
{
    prefill_args p = {{query,   q_tok,   q_head,    key_cache, value_cache, c_head,
                       c_block, c_slot,  tables,    t_row,     seq_lens,    n,
                       num_heads, num_kv_heads, head_dim, block_size, scale, out,
                       o_tok,   o_head,  dtype},
                      q_starts, q_lens, NULL, 0};
    int64_t items = 0;
    for (int64_t r = 0; r < n; ++r) items += (q_lens[r] + PREFILL_TILE - 1) / PREFILL_TILE;
    items *= num_kv_heads;
    int64_t *costs = malloc((size_t)(items + 1) * sizeof(int64_t));
    if (!costs) return -1;
    costs[0] = 0;
    for (int64_t item = 0; item < items; ++item) {
        int64_t r, h, j0, j1;
        prefill_item_bounds(&p, item, &r, &h, &j0, &j1);
        const int64_t cached = seq_lens[r] - q_lens[r];
        /* each query reads cached + j + 1 rows */
        costs[item + 1] = costs[item] + (j1 - j0) * (cached + (j0 + j1 + 1) / 2);
    }
    p.costs = costs;
    p.items = items;
    if (costs[items] * num_heads / num_kv_heads < (1 << 12)) workers = 1;
    if (workers > items) workers = (int)(items > 0 ? items : 1);
    kv_pool_run(prefill_task, &p, workers);
    free(costs);
    return 0;
}
