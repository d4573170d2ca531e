/* Decode attention straight from the paged KV cache: one query token per request.
 *
 * Each (request, kv head) item walks the request's block table and reads every cached
 * K/V row exactly once, in place: no gather, no padding. The query heads that share
 * the kv head (grouped-query attention) are served in the same pass over its rows.
 * Scores, then a softmax, then the weighted sum of V, all in float32; the cache and
 * the query/output may be float32, bfloat16 or float16 (DT_* below; all one dtype).
 * Items are shared among the workers by context length.
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

/* One item: query heads [h*G, (h+1)*G) of request r against its `len` cached rows. */
KV_INLINE void decode_item(const decode_args *a, int64_t r, int64_t h, const int64_t D,
                           const int dt)
{
    const int64_t len = a->seq_lens[r], bs = a->block_size, G = a->num_heads / a->num_kv_heads;
    const int64_t num_blocks = (len + bs - 1) / bs;
    const int32_t *table = a->tables + r * a->t_row;
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
            q[g * D + d] = load1(a->query, r * a->q_tok + (h * G + g) * a->q_head + d, dt);

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
            for (int64_t g = 0; g < G; ++g) {
                __m512 qv[16];
                for (int64_t c = 0; c < D / 16; ++c) qv[c] = _mm512_loadu_ps(q + g * D + 16 * c);
                float *sg = scores + g * len + t0;
                int64_t i = 0;
                for (; i + 4 <= rows; i += 4) {
                    __m512 part[4];
                    for (int r4 = 0; r4 < 4; ++r4) {
                        const float *k = (const float *)(krows + (i + r4) * kstride);
                        part[r4] = _mm512_mul_ps(_mm512_loadu_ps(k), qv[0]);
                        for (int64_t c = 1; c < D / 16; ++c)
                            part[r4] = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], part[r4]);
                    }
                    _mm_storeu_ps(sg + i, _mm_mul_ps(sum4(part), _mm_set1_ps(a->scale)));
                }
                for (; i < rows; ++i) {
                    const float *k = (const float *)(krows + i * kstride);
                    __m512 part = _mm512_mul_ps(_mm512_loadu_ps(k), qv[0]);
                    for (int64_t c = 1; c < D / 16; ++c)
                        part = _mm512_fmadd_ps(_mm512_loadu_ps(k + 16 * c), qv[c], part);
                    sg[i] = _mm512_reduce_add_ps(part) * a->scale;
                }
            }
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
                    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                    for (int64_t d = 0; d < D; ++d) sum += qg[d] * load1(k, d, dt);
                    scores[g * len + t0 + i] = sum * a->scale;
                }
            }
        }

    /* softmax over each head's scores */
    for (int64_t g = 0; g < G; ++g) {
        float *s = scores + g * len;
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
                    const float p = scores[g * len + t0 + i];
                    float *ag = acc + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; ++d) ag[d] += p * load1(v, d, dt);
                }
            }
        }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
            store1(a->out, r * a->o_tok + (h * G + g) * a->o_head + d, acc[g * D + d], dt);
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
