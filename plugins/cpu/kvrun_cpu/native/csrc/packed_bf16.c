/* bfloat16 matmuls on weights packed into 16-row panels of k pairs: y = x W^T (+ bias).
 *
 * A weight [n, k] is stored as panels [ceil(n/16)][ceil(k/2)][16][2]: one 64-byte line
 * holds the (k, k+1) pair of each of the panel's 16 output rows, which is the operand
 * AVX512-BF16's dot product (vdpbf16ps) reads: 32 multiply-adds per instruction into
 * 16 float32 sums. Without that extension the pairs are widened to float32 and
 * multiplied in two fused multiply-adds. Sums are float32, rounded to bfloat16 once at
 * the end (with the bias added first), as torch's bfloat16 matmul rounds. Tiles and
 * thread split are those of packed.c. In the AMX_BF16 build, once the process has the
 * tiles (kvrun_amx_init), every batch size runs on amx_bf16.c instead, on these same
 * panels: the two round pair sums differently, so the choice is per library, never per
 * batch size, and a token's result stays independent of its batch.
 */
#include <string.h>

#include "kvrun_cpu.h"

#define PANEL 16

typedef struct {
    const uint16_t *x; /* [m, k] bf16, row stride x_row */
    int64_t x_row;
    const uint16_t *panels; /* [ceil(n/16), ceil(k/2), 16, 2], 64-byte aligned */
    const uint16_t *bias;   /* [n] or NULL */
    uint16_t *y;            /* [m, n], row stride y_row */
    int64_t y_row, m, n, k;
} bf16_args;

/* x[r][2j], x[r][2j+1] as one 32-bit word (the odd one 0 past the row's end). */
KV_INLINE uint32_t pair_at(const uint16_t *x, int64_t j, int64_t k)
{
    if (2 * j + 1 < k) {
        uint32_t v;
        memcpy(&v, x + 2 * j, sizeof v);
        return v;
    }
    return x[2 * j];
}

KV_INLINE void tile(const bf16_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t K = a->k, pairs = (K + 1) / 2;
    const uint16_t *wp = a->panels + p * pairs * 2 * PANEL;
    const uint16_t *x = a->x + i * a->x_row;
    float sums[8][4][PANEL];
#if KV_AVX512
    __m512 acc[8][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; ++q) {
        __m512i w[4];
        for (int j = 0; j < NP; ++j)
            w[j] = _mm512_load_si512((const void *)(wp + (j * pairs + q) * 2 * PANEL));
        for (int r = 0; r < MR; ++r) {
            const uint32_t xp = pair_at(x + r * a->x_row, q, K);
#if defined(__AVX512BF16__)
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp);
            for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, (__m512bh)w[j]);
#else
            const __m512 x0 = _mm512_set1_ps(kv_bf16_to_f32((uint16_t)xp));
            const __m512 x1 = _mm512_set1_ps(kv_bf16_to_f32((uint16_t)(xp >> 16)));
            for (int j = 0; j < NP; ++j) {
                const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(w[j], 16));
                const __m512 w1 = _mm512_castsi512_ps(
                    _mm512_and_si512(w[j], _mm512_set1_epi32((int)0xffff0000u)));
                acc[r][j] = _mm512_fmadd_ps(x1, w1, _mm512_fmadd_ps(x0, w0, acc[r][j]));
            }
#endif
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) _mm512_storeu_ps(sums[r][j], acc[r][j]);
#else
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j)
            for (int l = 0; l < PANEL; ++l) sums[r][j][l] = 0.f;
    for (int64_t q = 0; q < pairs; ++q)
        for (int r = 0; r < MR; ++r) {
            const uint32_t xp = pair_at(x + r * a->x_row, q, K);
            const float x0 = kv_bf16_to_f32((uint16_t)xp), x1 = kv_bf16_to_f32((uint16_t)(xp >> 16));
            for (int j = 0; j < NP; ++j) {
                const uint16_t *w = wp + (j * pairs + q) * 2 * PANEL;
                for (int l = 0; l < PANEL; ++l)
                    sums[r][j][l] = __builtin_fmaf(
                        x1, kv_bf16_to_f32(w[2 * l + 1]),
                        __builtin_fmaf(x0, kv_bf16_to_f32(w[2 * l]), sums[r][j][l]));
            }
        }
#endif
    for (int j = 0; j < NP; ++j) {
        const int64_t col = (p + j) * PANEL;
        const int64_t cols = a->n - col < PANEL ? a->n - col : PANEL;
        for (int r = 0; r < MR; ++r) {
            uint16_t *y = a->y + (i + r) * a->y_row + col;
            for (int64_t l = 0; l < cols; ++l)
                y[l] = kv_f32_to_bf16(sums[r][j][l] + (a->bias ? kv_bf16_to_f32(a->bias[col + l]) : 0.f));
        }
    }
}

static void tile_any(const void *args, int64_t i, int64_t p, int64_t mr, int64_t np)
{
    const bf16_args *a = args;
#define T(MR, NP) \
    case (MR) * 8 + (NP): tile(a, i, p, MR, NP); return;
    switch (mr * 8 + np) { KV_TILE_SHAPES(T) }
#undef T
}

static void panels_bf16(const bf16_args *a, int64_t p_begin, int64_t p_end)
{
    if (kv_amx_ready())
        kv_amx_panels_bf16(a->x, a->x_row, a->panels, a->bias, a->y, a->y_row, a->m, a->n, a->k,
                           p_begin, p_end);
    else
        kv_for_each_tile(a, tile_any, a->m, p_begin, p_end);
}

void kv_packed_panels_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                           const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m, int64_t n,
                           int64_t k, int64_t p_begin, int64_t p_end)
{
    const bf16_args a = {x, x_row, panels, bias, y, y_row, m, n, k};
    panels_bf16(&a, p_begin, p_end);
}

static void linear_task(const void *args, int worker, int workers)
{
    const bf16_args *a = args;
    int64_t begin, end;
    kv_split((a->n + PANEL - 1) / PANEL, 1, worker, workers, &begin, &end);
    if (begin < end) panels_bf16(a, begin, end);
}

void kvrun_packed_linear_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                              const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m,
                              int64_t n, int64_t k, int workers)
{
    const bf16_args a = {x, x_row, panels, bias, y, y_row, m, n, k};
    if (n * k < 32768) workers = 1;
    kv_pool_run(linear_task, &a, workers);
}

/* kvrun_grouped_linear_f32 (packed.c) for bfloat16. */
void kvrun_grouped_linear_bf16(const uint16_t *x, int64_t x_row, const uint16_t *const *panels,
                               const int64_t *offsets, int64_t groups, uint16_t *y,
                               int64_t y_row, int64_t n, int64_t k, int workers)
{
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t m = offsets[g + 1] - offsets[g];
        if (m > 0)
            kvrun_packed_linear_bf16(x + offsets[g] * x_row, x_row, panels[g], NULL,
                                     y + offsets[g] * y_row, y_row, m, n, k, workers);
    }
}

/* --- packing ------------------------------------------------------------------------ */

typedef struct {
    const uint16_t *w; /* [n, k] bf16, row stride w_row */
    int64_t w_row, n, k;
    uint16_t *panels;
} pack_args;

static void pack_task(const void *args, int worker, int workers)
{
    const pack_args *a = args;
    const int64_t pairs = (a->k + 1) / 2;
    int64_t begin, end;
    kv_split((a->n + PANEL - 1) / PANEL, 1, worker, workers, &begin, &end);
    for (int64_t p = begin; p < end; ++p) {
        uint16_t *dst = a->panels + p * pairs * 2 * PANEL;
        for (int64_t l = 0; l < PANEL; ++l) {
            const int64_t row = p * PANEL + l;
            for (int64_t c = 0; c < 2 * pairs; ++c)
                dst[(c / 2) * 2 * PANEL + 2 * l + c % 2] =
                    row < a->n && c < a->k ? a->w[row * a->w_row + c] : 0;
        }
    }
}

void kvrun_pack_bf16(const uint16_t *w, int64_t w_row, int64_t n, int64_t k, uint16_t *panels,
                     int workers)
{
    const pack_args a = {w, w_row, n, k, panels};
    kv_pool_run(pack_task, &a, workers);
}

/* Rows `ids` of the packed bf16 [n, k] matrix into out [m, k]; -1, or the first bad id. */
int64_t kvrun_packed_rows_bf16(const int64_t *ids, int64_t m, const uint16_t *panels, int64_t n,
                               int64_t k, uint16_t *out)
{
    for (int64_t i = 0; i < m; ++i)
        if (ids[i] < 0 || ids[i] >= n) return i;
    for (int64_t i = 0; i < m; ++i) kv_packed_row(panels, k, ids[i], out + i * k, KV_BF16);
    return -1;
}

void kv_packed_row(const void *panels, int64_t k, int64_t row, void *out, int dt)
{
    if (dt == KV_BF16) {
        const int64_t pairs = (k + 1) / 2;
        const uint16_t *src = (const uint16_t *)panels + (row / PANEL) * pairs * 2 * PANEL + 2 * (row % PANEL);
        for (int64_t c = 0; c < k; ++c) ((uint16_t *)out)[c] = src[(c / 2) * 2 * PANEL + c % 2];
    } else {
        const float *src = (const float *)panels + (row / PANEL) * k * PANEL + row % PANEL;
        for (int64_t c = 0; c < k; ++c) ((float *)out)[c] = src[c * PANEL];
    }
}
