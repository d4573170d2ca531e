/* Quantized weights executed as stored (GGUF Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; AWQ 4-bit):
 * y = x W^T (+ bias).
 *
 * Layout (kvrun_cpu/native/quantized.py repacks a GGUF matrix into it once, at load):
 * panels of 16 output rows, each a run of blocks of 32 input columns; one block is
 *   - the 16 rows' 32 values as unsigned bytes in AVX512-VNNI's operand order: line g
 *     (64 bytes) holds, for each row l, the values of columns 4g .. 4g+3 in bytes
 *     4l .. 4l+3. 8-bit: 8 lines, the value + 128 (Q8_0's int8 made unsigned); 4-bit:
 *     4 lines, column c in the low nibble and column c + 16 in the high one (GGUF's own
 *     nibble order, so a Q4 row's 16 bytes are copied as they are);
 *   - 16 scales d, then 16 offsets o: row l's weight at column c is
 *     d[l] * v[l][c] + o[l] (Q4_1: o = its min; Q4_0: o = -8 d; Q8_0: o = -128 d), as
 *     fp16; Q4_K's (d times a sub-block's 6-bit scale, -dmin times its 6-bit min) as
 *     fp32, since those products need more than fp16's 11 bits.
 * Q6_K (format Q6) keeps its 6-bit values v in [0, 64): 4 lines of nibbles as 4-bit
 * (column c's low 4 bits in the low nibble, c + 16's in the high), then 2 lines of the
 * top 2 bits: line 4 + h, byte 4l + t holds those of columns 16h + 4i + t in bits 2i,
 * 2i + 1 (i = 0..3); then two fp32 scales per row, d_lo[16] and d_hi[16] (d times the
 * sub-block's int8 scale, one per 16 columns): weight d_half (v - 32).
 * A block is 576 (8-bit), 320 (4-bit), 384 (4-bit, fp32 scales) or 512 (Q6) bytes,
 * multiples of 64: every line is aligned.
 * AWQ (format QAWQ + gb: groups of gb blocks of 32 columns, AWQ's group_size / 32) keeps
 * one scale and zero point per row and group: a panel is a run of groups, each its gb
 * blocks' 4 nibble lines (256 bytes, the 4-bit order above: column c low, c + 16 high;
 * values q in [0, 16) unsigned) then one line of the 16 rows' fp16 scales s (32 bytes)
 * and uint8 zero points z (16 bytes, then 16 unused): weight s (q - z), exactly what
 * AWQ's dequantisation computes. 4.25 bits per value at group 128 (the checkpoint: 4.16).
 *
 * Activations are quantized per token and block of 32 to int8, as llama.cpp does:
 * dx = max|x| / 127, xq = round(x / dx) (to nearest even). Then, per block,
 *   sum_c w[c] x[c] ~= d * (dx * isum) + o * (dx * sum(xq)),  isum = sum_c v[c] xq[c]
 * where isum is exact in int32 (AVX512-VNNI's vpdpbusd: unsigned weight bytes times
 * signed activation bytes, four per lane). Q6 sums each half of 16 columns apart:
 *   sum ~= d_lo * (dx * (isum_lo - 32 s_lo)) + d_hi * (dx * (isum_hi - 32 s_hi)),
 * s_half the sum of the half's xq (exact integers until the one conversion to float).
 * AWQ subtracts the zero point in the integers alike: per block of its group,
 *   sum ~= s * (dx * (isum - z sx)),  sx the block's sum of xq.
 * Each output is accumulated over the blocks
 * in order with the same float operations on every path (VNNI and the portable C), so
 * the two give the same bits, and a token's result depends on its own row only, never
 * on its batch or on the thread split.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvrun_cpu.h"

#define PANEL 16
#define QBLOCK 32
#if KV_AVX512 && defined(__AVX512VNNI__)
#define KV_VNNI 1
#else
#define KV_VNNI 0
#endif

/* The formats (kvrun_cpu.native.quantized): 8 = 8-bit, 4 = 4-bit with fp16 scales,
   QF32 = 4-bit with fp32 scales, Q6 = 6-bit with two fp32 scales per row. */
#define QF32 36
#define Q6 KV_QUANT_Q6
#define QAWQ KV_QUANT_AWQ /* + blocks of 32 per group */
#define AWQ_BLOCK (4 * 64) /* one block's nibble lines; a group adds one line of scales */
KV_INLINE int64_t block_bytes(int bits)
{
    return bits == 8 ? 8 * 64 + 64 : bits == 4 ? 4 * 64 + 64 : bits == Q6 ? 6 * 64 + 128 : 4 * 64 + 128;
}
/* Where a block's scales start: its value lines' bytes. */
KV_INLINE int value_bits(int bits) { return bits == QF32 ? 4 : bits; }

/* Q6: the 6-bit value of row l, column c (0..31) of a block. */
KV_INLINE int q6_value(const uint8_t *blk, int64_t l, int c)
{
    const int g = c / 4, t = c % 4;
    const uint8_t nib = blk[(g % 4) * 64 + l * 4 + t];
    const uint8_t top = blk[4 * 64 + (g / 4) * 64 + l * 4 + t];
    return (g < 4 ? nib & 0x0f : nib >> 4) | ((top >> (2 * (g % 4))) & 3) << 4;
}

/* 4-bit formats (GGUF's and AWQ's nibble lines): the value of row l, column c (0..31). */
KV_INLINE int nibble_value(const uint8_t *blk, int64_t l, int c)
{
    const uint8_t byte = blk[(c % 16) / 4 * 64 + l * 4 + c % 4];
    return c < 16 ? byte & 0x0f : byte >> 4;
}

/* Row l's scale and offset in a block whose scales start at sc. */
KV_INLINE float f16_to_f32(uint16_t h);
KV_INLINE void scale_offset(const uint8_t *sc, int bits, int64_t l, float *d, float *o)
{
    if (bits == QF32) {
        memcpy(d, sc + 4 * l, sizeof *d);
        memcpy(o, sc + 64 + 4 * l, sizeof *o);
    } else {
        uint16_t h[2];
        memcpy(&h[0], sc + 2 * l, 2);
        memcpy(&h[1], sc + 32 + 2 * l, 2);
        *d = f16_to_f32(h[0]);
        *o = f16_to_f32(h[1]);
    }
}

/* 1: the AVX512-VNNI kernels; 0: the portable C (kvrun_cpu.native.quantized logs it). */
int kvrun_quant_isa(void) { return KV_VNNI; }

/* IEEE half to float, exactly (no F16C needed). */
KV_INLINE float f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        const float f = (float)man * (1.0f / 16777216.0f); /* man * 2^-24, exact */
        return sign ? -f : f;
    }
    v.u = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    return v.f;
}

/* --- activations -------------------------------------------------------------------- */

/* One block of 32 values v into q [32] int8 and xs2 [2] (dx and dx * sum(q)); returns
   sum(q). */
KV_INLINE int quantize_block(const float *v, int8_t *q, float *xs2)
{
#if KV_AVX512
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float amax = 0.f;
    for (int j = 0; j < QBLOCK; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < QBLOCK; ++j) {
        const float s = v[j] * id;
        q[j] = (int8_t)nearbyintf(s);
        sum += q[j];
    }
#endif
    xs2[0] = d;
    xs2[1] = d * (float)sum;
    return sum;
}

/* Row x [k] into xq [k] int8 and xs [k/32, 2] (dx and dx * sum(xq) per block). */
static void quantize_row(const float *x, int64_t k, int8_t *xq, float *xs)
{
    for (int64_t b = 0; b < k / QBLOCK; ++b) quantize_block(x + b * QBLOCK, xq + b * QBLOCK, xs + 2 * b);
}

void kv_quantize_blocks(const void *x, int64_t b_begin, int64_t b_end, int dt, int8_t *xq,
                        float *xs, int32_t *halves, int32_t *sums)
{
    float v[QBLOCK];
    for (int64_t b = b_begin; b < b_end; ++b) {
        const float *src = v;
        if (dt == KV_BF16) /* exact, as the op's x.float() */
            for (int j = 0; j < QBLOCK; ++j) v[j] = kv_ld(x, b * QBLOCK + j, KV_BF16);
        else
            src = (const float *)x + b * QBLOCK;
        int8_t *q = xq + b * QBLOCK;
        sums[b] = quantize_block(src, q, xs + 2 * b);
        int32_t half = 0;
        for (int j = 0; j < QBLOCK / 2; ++j) half += q[j];
        halves[2 * b] = half;
        halves[2 * b + 1] = sums[b] - half;
    }
}

/* --- the matmul ----------------------------------------------------------------------- */

typedef kv_quant_args quant_args; /* kvrun_cpu.h */

KV_INLINE void store_tile(const quant_args *a, int64_t i, int64_t p, int MR, int NP,
                          float acc[4][4][PANEL])
{
    for (int j = 0; j < NP; ++j) {
        const int64_t col = (p + j) * PANEL;
        const int64_t cols = a->n - col < PANEL ? a->n - col : PANEL;
        for (int r = 0; r < MR; ++r)
            for (int64_t l = 0; l < cols; ++l)
                kv_st(a->y, (i + r) * a->y_row + col + l,
                      acc[r][j][l] + (a->bias ? kv_ld(a->bias, col + l, a->dtype) : 0.f), a->dtype);
    }
}

#if KV_VNNI
KV_INLINE __m512i bcast32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* isum[r][j] += the 16 rows of a 4-bit block (4 nibble lines: column c low, c + 16 high)
   times block b of rows i .. i + MR - 1 of xq: GGUF's 4-bit formats and AWQ alike. */
KV_INLINE void nibble_dots(const quant_args *a, const uint8_t *blk, int64_t i, int64_t b,
                           const int MR, int j, __m512i isum[4][4])
{
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int g = 0; g < 4; ++g) {
        const __m512i v = _mm512_load_si512((const void *)(blk + 64 * g));
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < MR; ++r) {
            const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK;
            isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], lo, bcast32(xr + 4 * g));
            isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], hi, bcast32(xr + 16 + 4 * g));
        }
    }
}

/* MR (<= 4) rows of x from row i against NP (<= 4) panels from panel p, BITS 4 or 8. */
KV_INLINE void tile(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP,
                    const int BITS)
{
    const int64_t kb = a->k / QBLOCK, bs = block_bytes(BITS), data = value_bits(BITS) * 64;
    __m512 acc[4][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
        __m512i isum[4][4];
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NP; ++j) isum[r][j] = _mm512_setzero_si512();
        for (int j = 0; j < NP; ++j) {
            const uint8_t *blk = a->w + ((p + j) * kb + b) * bs;
            if (BITS != 8) {
                nibble_dots(a, blk, i, b, MR, j, isum);
            } else {
                for (int g = 0; g < 8; ++g) {
                    const __m512i v = _mm512_load_si512((const void *)(blk + 64 * g));
                    for (int r = 0; r < MR; ++r) {
                        const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK;
                        isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], v, bcast32(xr + 4 * g));
                    }
                }
            }
        }
        for (int j = 0; j < NP; ++j) {
            const uint8_t *sc = a->w + ((p + j) * kb + b) * bs + data;
            const __m512 d = BITS == QF32 ? _mm512_load_ps(sc)
                                          : _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)sc));
            const __m512 o = BITS == QF32 ? _mm512_load_ps(sc + 64)
                                          : _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sc + 32)));
            for (int r = 0; r < MR; ++r) {
                const float *s = a->xs + ((i + r) * kb + b) * 2;
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum[r][j]), _mm512_set1_ps(s[0]));
                acc[r][j] = _mm512_fmadd_ps(d, t, acc[r][j]);
                acc[r][j] = _mm512_fmadd_ps(o, _mm512_set1_ps(s[1]), acc[r][j]);
            }
        }
    }
    float out[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) _mm512_storeu_ps(out[r][j], acc[r][j]);
    store_tile(a, i, p, MR, NP, out);
}

/* Q6: each block's two halves of 16 columns in turn, the values rebuilt from their
   nibble and top-bit lines in registers. */
KV_INLINE void tile_q6(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t kb = a->k / QBLOCK, bs = block_bytes(Q6);
    const __m512i low = _mm512_set1_epi8(0x0f), two = _mm512_set1_epi8(0x03);
    __m512 acc[4][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; ++b)
        for (int h = 0; h < 2; ++h) {
            __m512i isum[4][4];
            for (int r = 0; r < MR; ++r)
                for (int j = 0; j < NP; ++j) isum[r][j] = _mm512_setzero_si512();
            for (int j = 0; j < NP; ++j) {
                const uint8_t *blk = a->w + ((p + j) * kb + b) * bs;
                const __m512i top = _mm512_load_si512((const void *)(blk + 4 * 64 + 64 * h));
                for (int g = 0; g < 4; ++g) {
                    const __m512i nib = _mm512_load_si512((const void *)(blk + 64 * g));
                    const __m512i lo4 = h ? _mm512_and_si512(_mm512_srli_epi16(nib, 4), low)
                                          : _mm512_and_si512(nib, low);
                    const __m512i hi2 = _mm512_and_si512(_mm512_srli_epi16(top, 2 * g), two);
                    const __m512i v = _mm512_or_si512(lo4, _mm512_slli_epi16(hi2, 4));
                    for (int r = 0; r < MR; ++r) {
                        const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK + 16 * h;
                        isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], v, bcast32(xr + 4 * g));
                    }
                }
            }
            for (int j = 0; j < NP; ++j) {
                const uint8_t *sc = a->w + ((p + j) * kb + b) * bs + 6 * 64 + 64 * h;
                const __m512 d = _mm512_load_ps(sc);
                for (int r = 0; r < MR; ++r) {
                    const float dx = a->xs[((i + r) * kb + b) * 2];
                    const int32_t shift = 32 * a->xh[((i + r) * kb + b) * 2 + h];
                    const __m512i q = _mm512_sub_epi32(isum[r][j], _mm512_set1_epi32(shift));
                    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(dx));
                    acc[r][j] = _mm512_fmadd_ps(d, t, acc[r][j]);
                }
            }
        }
    float out[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) _mm512_storeu_ps(out[r][j], acc[r][j]);
    store_tile(a, i, p, MR, NP, out);
}
/* AWQ: a group's scales and zero points held in registers across its blocks. */
KV_INLINE void tile_awq(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t kb = a->k / QBLOCK, gb = a->bits - QAWQ, gbytes = gb * AWQ_BLOCK + 64;
    const int64_t stride = kb / gb * gbytes; /* one panel */
    __m512 acc[4][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < kb / gb; ++g) {
        __m512 s[4];
        __m512i z[4];
        for (int j = 0; j < NP; ++j) {
            const uint8_t *sc = a->w + (p + j) * stride + g * gbytes + gb * AWQ_BLOCK;
            s[j] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)sc));
            z[j] = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(sc + 32)));
        }
        for (int64_t e = 0; e < gb; ++e) {
            const int64_t b = g * gb + e;
            __m512i isum[4][4];
            for (int r = 0; r < MR; ++r)
                for (int j = 0; j < NP; ++j) isum[r][j] = _mm512_setzero_si512();
            for (int j = 0; j < NP; ++j) {
                nibble_dots(a, a->w + (p + j) * stride + g * gbytes + e * AWQ_BLOCK, i, b, MR, j, isum);
            }
            for (int r = 0; r < MR; ++r) {
                const __m512 dx = _mm512_set1_ps(a->xs[((i + r) * kb + b) * 2]);
                const __m512i sx = _mm512_set1_epi32(a->xh[(i + r) * kb + b]);
                for (int j = 0; j < NP; ++j) {
                    const __m512i q = _mm512_sub_epi32(isum[r][j], _mm512_mullo_epi32(z[j], sx));
                    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(q), dx);
                    acc[r][j] = _mm512_fmadd_ps(s[j], t, acc[r][j]);
                }
            }
        }
    }
    float out[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) _mm512_storeu_ps(out[r][j], acc[r][j]);
    store_tile(a, i, p, MR, NP, out);
}
#else
/* The portable C: the same integer sums, then the same float operations in order. */
KV_INLINE void tile(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP,
                    const int BITS)
{
    const int64_t kb = a->k / QBLOCK, bs = block_bytes(BITS), data = value_bits(BITS) * 64;
    float acc[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j)
            for (int l = 0; l < PANEL; ++l) acc[r][j][l] = 0.f;
    for (int64_t b = 0; b < kb; ++b)
        for (int j = 0; j < NP; ++j) {
            const uint8_t *blk = a->w + ((p + j) * kb + b) * bs;
            const uint8_t *sc = blk + data;
            for (int r = 0; r < MR; ++r) {
                const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK;
                const float *s = a->xs + ((i + r) * kb + b) * 2;
                for (int l = 0; l < PANEL; ++l) {
                    int32_t isum = 0;
                    for (int c = 0; c < QBLOCK; ++c) {
                        int v;
                        if (BITS != 8) {
                            v = nibble_value(blk, l, c);
                        } else {
                            v = blk[c / 4 * 64 + l * 4 + c % 4];
                        }
                        isum += v * xr[c];
                    }
                    const float t = (float)isum * s[0];
                    float d, o;
                    scale_offset(sc, BITS, l, &d, &o);
                    acc[r][j][l] = __builtin_fmaf(d, t, acc[r][j][l]);
                    acc[r][j][l] = __builtin_fmaf(o, s[1], acc[r][j][l]);
                }
            }
        }
    store_tile(a, i, p, MR, NP, acc);
}

KV_INLINE void tile_q6(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t kb = a->k / QBLOCK, bs = block_bytes(Q6);
    float acc[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j)
            for (int l = 0; l < PANEL; ++l) acc[r][j][l] = 0.f;
    for (int64_t b = 0; b < kb; ++b)
        for (int h = 0; h < 2; ++h)
            for (int j = 0; j < NP; ++j) {
                const uint8_t *blk = a->w + ((p + j) * kb + b) * bs;
                const uint8_t *sc = blk + 6 * 64 + 64 * h;
                for (int r = 0; r < MR; ++r) {
                    const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK;
                    const float dx = a->xs[((i + r) * kb + b) * 2];
                    const int32_t shift = 32 * a->xh[((i + r) * kb + b) * 2 + h];
                    for (int l = 0; l < PANEL; ++l) {
                        int32_t isum = 0;
                        for (int c = 16 * h; c < 16 * h + 16; ++c) isum += q6_value(blk, l, c) * xr[c];
                        const float t = (float)(isum - shift) * dx;
                        float d;
                        memcpy(&d, sc + 4 * l, sizeof d);
                        acc[r][j][l] = __builtin_fmaf(d, t, acc[r][j][l]);
                    }
                }
            }
    store_tile(a, i, p, MR, NP, acc);
}
KV_INLINE void tile_awq(const quant_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t kb = a->k / QBLOCK, gb = a->bits - QAWQ, gbytes = gb * AWQ_BLOCK + 64;
    const int64_t stride = kb / gb * gbytes;
    float acc[4][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j)
            for (int l = 0; l < PANEL; ++l) acc[r][j][l] = 0.f;
    for (int64_t b = 0; b < kb; ++b)
        for (int j = 0; j < NP; ++j) {
            const uint8_t *grp = a->w + (p + j) * stride + b / gb * gbytes;
            const uint8_t *blk = grp + b % gb * AWQ_BLOCK, *sc = grp + gb * AWQ_BLOCK;
            for (int r = 0; r < MR; ++r) {
                const int8_t *xr = a->xq + (i + r) * a->k + b * QBLOCK;
                const float dx = a->xs[((i + r) * kb + b) * 2];
                const int32_t sx = a->xh[(i + r) * kb + b];
                for (int l = 0; l < PANEL; ++l) {
                    int32_t isum = 0;
                    for (int c = 0; c < QBLOCK; ++c) isum += nibble_value(blk, l, c) * xr[c];
                    uint16_t h;
                    memcpy(&h, sc + 2 * l, 2);
                    const float t = (float)(isum - (int32_t)sc[32 + l] * sx) * dx;
                    acc[r][j][l] = __builtin_fmaf(f16_to_f32(h), t, acc[r][j][l]);
                }
            }
        }
    store_tile(a, i, p, MR, NP, acc);
}
#endif

static void tile_any(const quant_args *a, int64_t i, int64_t p, int64_t mr, int64_t np)
{
#define T(MR, NP)                                                  \
    case (MR) * 8 + (NP):                                          \
        if (a->bits == 4) tile(a, i, p, MR, NP, 4);                \
        else if (a->bits == QF32) tile(a, i, p, MR, NP, QF32);     \
        else if (a->bits == Q6) tile_q6(a, i, p, MR, NP);          \
        else if (a->bits > QAWQ) tile_awq(a, i, p, MR, NP);        \
        else tile(a, i, p, MR, NP, 8);                             \
        return;
    switch (mr * 8 + np) {
        T(4, 2) T(4, 1) T(3, 2) T(3, 1) T(2, 2) T(2, 1) T(1, 4) T(1, 3) T(1, 2) T(1, 1)
    }
#undef T
}

/* Decode (one row): 4 panels per tile for four independent chains of vpdpbusd;
   batches: 4 rows x 2 panels, the weights unpacked once per 4 rows. */
KV_INLINE int64_t tile_width(const quant_args *a) { return a->m == 1 ? 4 : 2; }

void kv_quant_panels(const quant_args *a, int64_t p_begin, int64_t p_end)
{
    const int64_t wide = tile_width(a);
    for (int64_t p = p_begin; p < p_end; p += wide) {
        const int64_t np = p_end - p < wide ? p_end - p : wide;
        for (int64_t i = 0; i < a->m; i += 4) tile_any(a, i, p, a->m - i < 4 ? a->m - i : 4, np);
    }
}

static void quant_task(const void *args, int worker, int workers)
{
    const quant_args *a = args;
    int64_t begin, end;
    kv_split((a->n + PANEL - 1) / PANEL, tile_width(a), worker, workers, &begin, &end);
    kv_quant_panels(a, begin, end);
}

/* y [m, n] = x [m, k] (float32, row stride x_row) times the packed matrix transposed
   (+ bias [n]). k is a multiple of 32. Returns 0, or -1 when scratch memory ran out. */
int kvrun_quant_linear(const float *x, int64_t x_row, const uint8_t *w, int bits,
                       const float *bias, float *y, int64_t y_row, int64_t m, int64_t n, int64_t k,
                       int workers)
{
    const int64_t kb = k / QBLOCK;
    int8_t *xq = aligned_alloc(64, (size_t)((m * k + 63) / 64 * 64));
    float *xs = malloc(sizeof(float) * (size_t)(m * kb * 2 + 1));
    if (xq == NULL || xs == NULL) {
        free(xq);
        free(xs);
        return -1;
    }
    /* Q6: the sum of each half block's xq (16 values); AWQ: each block's (32) */
    const int64_t sums = bits == Q6 ? m * kb * 2 : bits > QAWQ ? m * kb : 0, span = bits == Q6 ? 16 : 32;
    int32_t *xh = NULL;
    if (sums && (xh = malloc(sizeof(int32_t) * (size_t)sums)) == NULL) {
        free(xq);
        free(xs);
        return -1;
    }
    for (int64_t i = 0; i < m; ++i) quantize_row(x + i * x_row, k, xq + i * k, xs + i * kb * 2);
    if (xh != NULL)
        for (int64_t i = 0; i < sums; ++i) {
            int32_t sum = 0;
            for (int c = 0; c < span; ++c) sum += xq[i * span + c];
            xh[i] = sum;
        }
    const quant_args a = {xq, xs, xh, w, bias, y, y_row, m, n, k, bits, KV_F32};
    /* Below ~32 KiB of quantized weights a second thread costs more than it saves. */
    if (n * k < 65536) workers = 1;
    kv_pool_run(quant_task, &a, workers);
    free(xq);
    free(xs);
    free(xh);
    return 0;
}

void kv_quant_row(const uint8_t *w, int bits, int64_t k, int64_t row, void *out, int dt)
{
    const int64_t kb = k / QBLOCK, p = row / PANEL, l = row % PANEL;
    if (bits > QAWQ) { /* s (q - z): AWQ's dequantisation, one rounding */
        const int64_t gb = bits - QAWQ, gbytes = gb * AWQ_BLOCK + 64, stride = kb / gb * gbytes;
        for (int64_t b = 0; b < kb; ++b) {
            const uint8_t *grp = w + p * stride + b / gb * gbytes;
            const uint8_t *blk = grp + b % gb * AWQ_BLOCK, *sc = grp + gb * AWQ_BLOCK;
            uint16_t h;
            memcpy(&h, sc + 2 * l, 2);
            const float s = f16_to_f32(h);
            for (int c = 0; c < QBLOCK; ++c)
                kv_st(out, b * QBLOCK + c, s * (float)(nibble_value(blk, l, c) - sc[32 + l]), dt);
        }
        return;
    }
    const int64_t bs = block_bytes(bits), data = value_bits(bits) * 64;
    for (int64_t b = 0; b < kb; ++b) {
        const uint8_t *blk = w + (p * kb + b) * bs;
        if (bits == Q6) { /* the loader's (d sc) (v - 32), one rounding */
            for (int c = 0; c < QBLOCK; ++c) {
                float d;
                memcpy(&d, blk + data + 64 * (c / 16) + 4 * l, sizeof d);
                kv_st(out, b * QBLOCK + c, d * (float)(q6_value(blk, l, c) - 32), dt);
            }
            continue;
        }
        float d, o;
        scale_offset(blk + data, bits, l, &d, &o);
        for (int c = 0; c < QBLOCK; ++c) {
            const int v = bits != 8 ? nibble_value(blk, l, c) : blk[c / 4 * 64 + l * 4 + c % 4];
            const float dv = d * (float)v; /* exact: at most 17 by 8 significant bits */
            kv_st(out, b * QBLOCK + c, dv + o, dt);
        }
    }
}

/* Rows `ids` of the packed [n, k] matrix in float32 (an embedding lookup): out [m, k],
   each value d * v + o exactly as the GGUF dequantisation computes it. Returns -1, or
   the index of the first id outside [0, n), writing nothing. */
int64_t kvrun_quant_rows(const int64_t *ids, int64_t m, const uint8_t *w, int bits, int64_t n,
                         int64_t k, float *out)
{
    for (int64_t i = 0; i < m; ++i)
        if (ids[i] < 0 || ids[i] >= n) return i;
    for (int64_t i = 0; i < m; ++i) kv_quant_row(w, bits, k, ids[i], out + i * k, KV_F32);
    return -1;
}
