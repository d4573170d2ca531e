/* float32 matmuls on weights packed into 16-row panels: y = x W^T (+ bias).
 *
 * A weight [n, k] is stored as panels [ceil(n/16)][k][16]: for each input column, the
 * 16 weights of one panel's output rows sit in one 64-byte line. A tile of MR rows of x
 * against NP panels then keeps MR x NP vectors of 16 sums in registers, broadcasts one
 * x value per row and column, and reads each panel as one contiguous stream: no
 * horizontal sums, and the hardware prefetcher sees a few long streams. The same tiles
 * serve decode (a few rows of x: bound by reading the weights once) and batches (up to
 * 8 x 32 tiles: bound by the FMA units). Each output is the sum over k in order, one
 * fused multiply-add at a time, whatever the tile, so results do not depend on the
 * batch a token is in or on the thread split.
 */
#include "kvrun_cpu.h"

#define PANEL 16
#define ROW_BLOCK 64 /* rows of x kept hot in L2 while the panels stream past */

typedef kv_packed_args packed_args;

/* MR rows of x (starting at row i) against NP panels (starting at panel p). */
KV_INLINE void tile(const packed_args *a, int64_t i, int64_t p, const int MR, const int NP)
{
    const int64_t K = a->k;
    const float *wp = a->panels + p * K * PANEL;
    const float *x = a->x + i * a->x_row;
#if KV_AVX512
    __m512 acc[8][4];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 w[4];
        for (int j = 0; j < NP; ++j) w[j] = _mm512_load_ps(wp + (j * K + k) * PANEL);
        for (int r = 0; r < MR; ++r) {
            const __m512 xv = _mm512_set1_ps(x[r * a->x_row + k]);
            for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
        }
    }
    for (int j = 0; j < NP; ++j) {
        const int64_t col = (p + j) * PANEL;
        const int64_t left = a->n - col;
        const __mmask16 mask = left >= PANEL ? (__mmask16)0xffff : kv_tail_mask(left);
        const __m512 b = a->bias ? _mm512_maskz_loadu_ps(mask, a->bias + col) : _mm512_setzero_ps();
        for (int r = 0; r < MR; ++r)
            _mm512_mask_storeu_ps(a->y + (i + r) * a->y_row + col, mask, _mm512_add_ps(acc[r][j], b));
    }
#else
    float acc[8][4][PANEL];
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NP; ++j)
            for (int l = 0; l < PANEL; ++l) acc[r][j][l] = 0.f;
    for (int64_t k = 0; k < K; ++k)
        for (int r = 0; r < MR; ++r) {
            const float xv = x[r * a->x_row + k];
            for (int j = 0; j < NP; ++j) {
                const float *w = wp + (j * K + k) * PANEL;
#pragma omp simd
                for (int l = 0; l < PANEL; ++l) acc[r][j][l] = __builtin_fmaf(xv, w[l], acc[r][j][l]);
            }
        }
    for (int j = 0; j < NP; ++j) {
        const int64_t col = (p + j) * PANEL;
        const int64_t cols = a->n - col < PANEL ? a->n - col : PANEL;
        for (int r = 0; r < MR; ++r)
            for (int64_t l = 0; l < cols; ++l)
                a->y[(i + r) * a->y_row + col + l] = acc[r][j][l] + (a->bias ? a->bias[col + l] : 0.f);
    }
#endif
}

static void tile_any(const void *args, int64_t i, int64_t p, int64_t mr, int64_t np)
{
    const packed_args *a = args;
#define T(MR, NP) \
    case (MR) * 8 + (NP): tile(a, i, p, MR, NP); return;
    switch (mr * 8 + np) { KV_TILE_SHAPES(T) }
#undef T
}

void kv_for_each_tile(const void *args, kv_tile_fn tile_fn, int64_t m, int64_t p_begin,
                      int64_t p_end)
{
    for (int64_t i0 = 0; i0 < m; i0 += ROW_BLOCK) {
        const int64_t i_end = m - i0 < ROW_BLOCK ? m : i0 + ROW_BLOCK;
        const int64_t wide = i_end - i0 >= 8 ? 2 : 4; /* panels per tile */
        for (int64_t p = p_begin; p < p_end; p += wide) {
            const int64_t np = p_end - p < wide ? p_end - p : wide;
            for (int64_t i = i0; i < i_end;) {
                const int64_t left = i_end - i;
                const int64_t mr = np > 2 ? (left < 4 ? left : 4) : (left < 8 ? left : 8);
                tile_fn(args, i, p, mr, np);
                i += mr;
            }
        }
    }
}

void kv_packed_panels(const packed_args *a, int64_t p_begin, int64_t p_end)
{
    kv_for_each_tile(a, tile_any, a->m, p_begin, p_end);
}

static void packed_task(const void *args, int worker, int workers)
{
    const packed_args *a = args;
    int64_t begin, end;
    kv_split((a->n + PANEL - 1) / PANEL, 1, worker, workers, &begin, &end);
    if (begin < end) kv_packed_panels(a, begin, end);
}

void kvrun_packed_linear_f32(const float *x, int64_t x_row, const float *panels, const float *bias,
                             float *y, int64_t y_row, int64_t m, int64_t n, int64_t k, int workers)
{
    const packed_args a = {x, x_row, panels, bias, y, y_row, m, n, k};
    /* Below ~64 KiB of weights a second thread costs more than it saves. */
    if (n * k < 16384) workers = 1;
    kv_pool_run(packed_task, &a, workers);
}

/* One matmul per group of rows: rows offsets[g]..offsets[g+1] of x through the g-th
 * packed matrix, into the same rows of y (a mixture of experts: the tokens sorted by
 * expert, each expert's matrix read once). Empty groups cost nothing. */
void kvrun_grouped_linear_f32(const float *x, int64_t x_row, const float *const *panels,
                              const int64_t *offsets, int64_t groups, float *y, int64_t y_row,
                              int64_t n, int64_t k, int workers)
{
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t m = offsets[g + 1] - offsets[g];
        if (m > 0)
            kvrun_packed_linear_f32(x + offsets[g] * x_row, x_row, panels[g], NULL,
                                    y + offsets[g] * y_row, y_row, m, n, k, workers);
    }
}

/* --- packing ------------------------------------------------------------------------ */

typedef struct {
    const float *w; /* [n, k], row stride w_row */
    int64_t w_row, n, k;
    float *panels; /* [ceil(n/16), k, 16] */
} pack_args;

static void pack_task(const void *args, int worker, int workers)
{
    const pack_args *a = args;
    int64_t begin, end;
    kv_split((a->n + PANEL - 1) / PANEL, 1, worker, workers, &begin, &end);
    for (int64_t p = begin; p < end; ++p) {
        float *dst = a->panels + p * a->k * PANEL;
        for (int64_t l = 0; l < PANEL; ++l) {
            const int64_t row = p * PANEL + l;
            const float *src = a->w + row * a->w_row;
            if (row < a->n)
                for (int64_t c = 0; c < a->k; ++c) dst[c * PANEL + l] = src[c];
            else
                for (int64_t c = 0; c < a->k; ++c) dst[c * PANEL + l] = 0.f;
        }
    }
}

void kvrun_pack_f32(const float *w, int64_t w_row, int64_t n, int64_t k, float *panels, int workers)
{
    const pack_args a = {w, w_row, n, k, panels};
    kv_pool_run(pack_task, &a, workers);
}

/* Rows `ids` of the packed [n, k] matrix, as an embedding lookup reads them: out [m, k].
   Returns -1, or the index of the first id outside [0, n) and writes nothing. */
int64_t kvrun_packed_rows_f32(const int64_t *ids, int64_t m, const float *panels, int64_t n,
                              int64_t k, float *out)
{
    for (int64_t i = 0; i < m; ++i)
        if (ids[i] < 0 || ids[i] >= n) return i;
    for (int64_t i = 0; i < m; ++i) kv_packed_row(panels, k, ids[i], out + i * k, KV_F32);
    return -1;
}
