/* kvrun-cpu's native kernels: shared declarations.
 *
 * Everything here is plain C99 with no torch headers, called through ctypes. Tensors
 * arrive as raw pointers plus element strides; the Python side checks shapes, dtypes
 * and bounds before calling, because nothing here does.
 */
#ifndef KVRUN_CPU_H
#define KVRUN_CPU_H

#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define KV_AVX512 1
#else
#define KV_AVX512 0
#endif

#define KV_INLINE static inline __attribute__((always_inline))
/* Shared between the sources of the library, not exported from it. */
#define KV_INTERNAL __attribute__((visibility("hidden")))

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 }; /* dtype codes (kvrun_cpu.native.DTYPE_CODES) */

/* A task runs once on each of `workers` threads; `worker` is 0 (the caller) .. workers-1. */
typedef void (*kv_task_fn)(const void *args, int worker, int workers);

/* Run fn(args, w, workers) for every w on the pool (the caller runs w = 0) and return
   when all are done. workers <= 1 runs on the caller alone. Calls are serialised. */
void kv_pool_run(kv_task_fn fn, const void *args, int workers);

/* The part [*begin, *end) of [0, total) that `worker` of `workers` takes: equal shares
   whose boundaries are multiples of `align` (the last share takes the remainder). */
KV_INLINE void kv_split(int64_t total, int64_t align, int worker, int workers, int64_t *begin,
                        int64_t *end)
{
    int64_t share = (total + workers - 1) / workers;
    share = (share + align - 1) / align * align;
    int64_t b = share * worker, e = b + share;
    *begin = b < total ? b : total;
    *end = e < total ? e : total;
}

/* --- pieces the fused decode step (decoder.c) shares with the op-level kernels --- */
/* Each takes a dtype code (KV_F32 or KV_BF16) and computes exactly what the op-level
   kernel computes for that dtype. */

/* y = x W^T (+ bias), W packed into 16-row panels (packed.c, packed_bf16.c), for output
   panels [p_begin, p_end), i.e. columns [16 p_begin, 16 p_end) of y. */
typedef struct {
    const float *x; /* [m, k], row stride x_row */
    int64_t x_row;
    const float *panels; /* [ceil(n/16), k, 16], 64-byte aligned */
    const float *bias;   /* [n] or NULL */
    float *y;            /* [m, n], row stride y_row */
    int64_t y_row, m, n, k;
} kv_packed_args;
KV_INTERNAL void kv_packed_panels(const kv_packed_args *a, int64_t p_begin, int64_t p_end);
/* The tile order both packed matmuls use (packed.c): blocks of rows of x kept hot in L2
   while panels [p_begin, p_end) stream past, in tiles of up to 8 rows x 2 panels (8 or
   more rows in the block) or 4 x 4 (fewer); tile(args, i, p, mr, np) computes rows
   [i, i + mr) against panels [p, p + np). */
typedef void (*kv_tile_fn)(const void *args, int64_t i, int64_t p, int64_t mr, int64_t np);
/* Every (mr, np) kv_for_each_tile hands out, for a switch over mr * 8 + np. */
#define KV_TILE_SHAPES(T)                                                                  \
    T(8, 2) T(8, 1) T(7, 2) T(7, 1) T(6, 2) T(6, 1) T(5, 2) T(5, 1) T(4, 4) T(4, 3) T(4, 2) \
    T(4, 1) T(3, 4) T(3, 3) T(3, 2) T(3, 1) T(2, 4) T(2, 3) T(2, 2) T(2, 1) T(1, 4) T(1, 3) \
    T(1, 2) T(1, 1)
KV_INTERNAL void kv_for_each_tile(const void *args, kv_tile_fn tile, int64_t m, int64_t p_begin,
                                  int64_t p_end);
KV_INTERNAL void kv_packed_panels_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                                       const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m,
                                       int64_t n, int64_t k, int64_t p_begin, int64_t p_end);
/* The same on AMX tiles (amx_bf16.c), only where kv_amx_ready(): this process was
   granted the tiles (kvrun_amx_init) by a library built for AMX. */
KV_INTERNAL int kv_amx_ready(void);
KV_INTERNAL void kv_amx_panels_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                                    const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m,
                                    int64_t n, int64_t k, int64_t p_begin, int64_t p_end);
/* Row `row` of a packed [n, k] matrix into out [k]. */
KV_INTERNAL void kv_packed_row(const void *panels, int64_t k, int64_t row, void *out, int dt);

/* Quantized matrices (quant.c): y = x W^T (+ bias), x quantized per row and block of 32
   to int8 (kv_quantize_blocks), W in one of quant.c's formats (`bits`: 8, 4, 36 (4-bit,
   fp32 scales), KV_QUANT_Q6, or KV_QUANT_AWQ + blocks of 32 per group). */
enum { KV_QUANT_Q6 = 6, KV_QUANT_AWQ = 1000 };
typedef struct {
    const int8_t *xq;  /* [m, k] */
    const float *xs;   /* [m, k/32, 2]: dx and dx * sum(xq) per block */
    const int32_t *xh; /* Q6: [m, k/32, 2] each half block's sum of xq; AWQ: [m, k/32]
                          each block's; else NULL */
    const uint8_t *w;  /* quant.c's panels, 64-byte aligned */
    const void *bias;  /* [n] in `dtype`, or NULL */
    void *y;           /* [m, n] in `dtype`, row stride y_row */
    int64_t y_row, m, n, k;
    int bits;
    int dtype; /* of bias and y (KV_F32 or KV_BF16): float32 sums, rounded once at the end */
} kv_quant_args;
/* Blocks [b_begin, b_end) of one row x [k] (dtype dt) into that row's xq [k], xs
   [k/32, 2], halves [k/32, 2] and sums [k/32]: what kvrun_quant_linear computes for it. */
KV_INTERNAL void kv_quantize_blocks(const void *x, int64_t b_begin, int64_t b_end, int dt,
                                    int8_t *xq, float *xs, int32_t *halves, int32_t *sums);
/* Output panels [p_begin, p_end) (columns [16 p_begin, 16 p_end) of y). */
KV_INTERNAL void kv_quant_panels(const kv_quant_args *a, int64_t p_begin, int64_t p_end);
/* Row `row` of a quantized [n, k] matrix into out [k] (dtype dt), as kvrun_quant_rows. */
KV_INTERNAL void kv_quant_row(const uint8_t *w, int bits, int64_t k, int64_t row, void *out,
                              int dt);

/* Decode attention over a paged cache (attention.c). */
typedef struct {
    const void *query; /* [n, Hq, D], strides q_tok, q_head (elements) */
    int64_t q_tok, q_head;
    const void *key_cache, *value_cache; /* [Hk, num_blocks, block_size, D] via strides */
    int64_t c_head, c_block, c_slot;
    const int32_t *tables; /* [n, t_row] */
    int64_t t_row;
    const int32_t *seq_lens; /* [n] */
    int64_t n, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    void *out; /* [n, Hq, D], strides o_tok, o_head */
    int64_t o_tok, o_head;
    int dtype;
} kv_decode_args;
/* The (request, kv head) items, item = request * Hk + head, that `worker` takes. */
KV_INTERNAL void kv_decode_range(const kv_decode_args *a, int worker, int workers, int64_t *begin,
                                 int64_t *end);
/* One item: query heads [h*G, (h+1)*G) of request r against its cached rows. */
KV_INTERNAL void kv_decode_item(const kv_decode_args *a, int64_t r, int64_t h);

/* Batched LoRA (lora.c): out = y + scale_s * (x A_s^T) B_s^T per token of slot s. */
typedef struct {
    const void *y, *x, *a, *b; /* [T, N] (y_row), [T, K] (x_row), [S, R, K], [S, N, R] */
    int64_t y_row, x_row;
    const float *scales;    /* [S] */
    const int64_t *slots;   /* [T] */
    const int64_t *order;   /* [T] the tokens grouped by slot, the no-slot tokens last */
    const int64_t *starts;  /* [S + 1] group s is order[starts[s] .. starts[s + 1]) */
    float *buf;             /* [R, T]: buf[j * T + p], p a grouped position */
    void *out;              /* [T, N] (o_row); may be y itself (same row stride) */
    int64_t o_row, tokens, n, k, r, num_slots;
    int dtype;
} kv_lora_args;
/* order [T] and starts [S + 2] of slots [T] (each in [-1, S)): a counting sort by slot,
   the no-slot tokens (-1) last, from starts[S]. */
KV_INTERNAL void kv_lora_group(const int64_t *slots, int64_t tokens, int64_t num_slots,
                               int64_t *order, int64_t *starts);
/* buf for the grouped positions [p_begin, p_end) (all below starts[S]): reads x. */
KV_INTERNAL void kv_lora_shrink(const kv_lora_args *a, int64_t p_begin, int64_t p_end);
/* out columns [n0, n1) of every token from y and buf (the whole shrink done first). */
KV_INTERNAL void kv_lora_expand(const kv_lora_args *a, int64_t n0, int64_t n1);

/* Rows (elementwise.c). */
KV_INTERNAL void kv_rms_norm_row(const void *x, const void *weight, void *out, int64_t n,
                                 float eps, int dt);
/* res = x + res, rounded to dt: the residual stream. */
KV_INTERNAL void kv_add_row(const void *x, void *res, int64_t n, int dt);
KV_INTERNAL void kv_rotate_head(const void *x, void *out, const float *cos_sin, int64_t half,
                                int dt);
KV_INTERNAL void kv_silu_mul(const void *gate, const void *up, void *out, int64_t n, int dt);

/* bf16 <-> fp32 (round to nearest even, NaN kept quiet), as torch converts. */
KV_INLINE float kv_bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

KV_INLINE uint16_t kv_f32_to_bf16(float f)
{
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* Element i of an f32 or bf16 array (dtype code KV_F32 or KV_BF16) as float, stored back,
   and what a value rounded to the dtype reads back as: the scalar paths' accessors. */
KV_INLINE float kv_ld(const void *p, int64_t i, const int dt)
{
    return dt == KV_BF16 ? kv_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

KV_INLINE void kv_st(void *p, int64_t i, float v, const int dt)
{
    if (dt == KV_BF16)
        ((uint16_t *)p)[i] = kv_f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

KV_INLINE float kv_rnd(float v, const int dt) { return dt == KV_BF16 ? kv_bf16_to_f32(kv_f32_to_bf16(v)) : v; }

#if KV_AVX512
/* exp(x) for every lane: Cephes' expf polynomial after a reduction by ln 2; within
   2 ulp of expf over the range softmax and silu use. */
KV_INLINE __m512 kv_exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.72283f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}

/* 16 bf16 <-> 16 float32, rounding to nearest even as kv_f32_to_bf16 (NaN kept quiet). */
KV_INLINE __m512 kv_bf16x16_to_f32(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

KV_INLINE __m256i kv_f32x16_to_bf16(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* The low `n` (< 16) lanes set. */
KV_INLINE __mmask16 kv_tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); }
#endif

#endif
