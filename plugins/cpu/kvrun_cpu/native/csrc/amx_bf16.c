/* bfloat16 matmuls on AMX tiles (Intel Sapphire Rapids and later): y = x W^T (+ bias).
 *
 * The weights stay in packed_bf16.c's panels [ceil(n/16)][ceil(k/2)][16][2]: 16
 * consecutive k pairs of one panel are 16 lines of 64 bytes, exactly the B operand of
 * TDPBF16PS (16 pair-rows x 16 output columns), so a B tile is one contiguous 1 KiB
 * load and nothing is repacked at load. The A operand is 16 rows of x x 32 k values,
 * loaded straight from x with its row stride; rows past m and k past the row's end
 * come from a zero-padded copy of those rows, and k pairs past the panel's end from a
 * zero-padded copy of that last B tile. Tiles: 2 A (32 rows) x 2 B (2 panels) into 4
 * C tiles of 16 x 16 float32 sums, k in chunks of 32 in order; each sum is rounded to
 * bfloat16 once at the end, after the bias is added, as packed_bf16.c rounds.
 *
 * Each output is row m of x against column n of W, chunk after chunk of k in order,
 * whatever the tile a row shares: a token's result does not depend on its batch mates
 * or the thread split. TDPBF16PS adds the even element of each pair before the odd one
 * and VDPBF16PS the odd one first, so the two paths need not agree bit for bit; which
 * one runs is fixed per library (kv_amx_ready), not per batch size.
 *
 * Linux hands out the tiles' register state only to a process that asks for it
 * (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): kvrun_amx_init asks, once per
 * process, before any tile instruction; the permission covers every thread of the
 * process, those OpenMP already started included.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kvrun_cpu.h"

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Codes kvrun_amx_init returns besides 0 (granted) and a positive errno
   (kvrun_cpu.native.amx.INIT_ERRORS mirrors them). */
enum { AMX_NOT_BUILT = -1, AMX_NO_CPU = -2, AMX_NOT_GRANTED = -3 };

static int amx_granted; /* set once by kvrun_amx_init, before any kernel reads it */

int kv_amx_ready(void) { return amx_granted; }

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__) && defined(__x86_64__)

int kvrun_amx_init(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return AMX_NO_CPU;
    if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return AMX_NO_CPU; /* AMX-BF16, AMX-TILE */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return errno;
    unsigned long long features = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &features) != 0) return errno;
    if (!(features & (1ull << XFEATURE_XTILEDATA))) return AMX_NOT_GRANTED;
    amx_granted = 1;
    return 0;
}

#define PANEL 16
#define KCHUNK 32     /* bf16 values of k per tile row */
#define ROW_BLOCK 256 /* rows of x kept hot in L2 while the panels stream past */

/* The tile configuration ldtilecfg reads (palette 1). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config;

/* Tiles 0-3 hold C, 4-5 A (rows i..i+15, i+16..i+31), 6-7 B (panels p, p+1): every one
   16 rows of 64 bytes. */
static void configure(void)
{
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

typedef struct {
    const uint16_t *x; /* [m, k], row stride x_row */
    int64_t x_row;
    const uint16_t *panels, *bias;
    uint16_t *y;
    int64_t y_row, m, n, k;
    int64_t pairs, chunks; /* ceil(k/2) pairs per panel row; ceil(k/32) chunks */
    /* rows [pad_from, m) are read from pad [.., chunks * 32] instead of x (all of them
       when k is not a multiple of 32) */
    const uint16_t *pad;
    int64_t pad_from;
} amx_args;

/* Where the A tile of rows [i, i + 16) starts, and its row stride in bytes. */
KV_INLINE const uint16_t *a_rows(const amx_args *a, int64_t i, int64_t *stride)
{
    if (i >= a->pad_from) {
        *stride = a->chunks * KCHUNK * 2;
        return a->pad + (i - a->pad_from) * a->chunks * KCHUNK;
    }
    *stride = a->x_row * 2;
    return a->x + i * a->x_row;
}

/* C tile t (16 x 16 float32) to rows [i, i + rows) of y at panel p, with the bias. */
KV_INLINE void store_c(const amx_args *a, const float *c, int64_t i, int64_t rows, int64_t p)
{
    const int64_t col = p * PANEL;
    const int64_t left = a->n - col;
    const __mmask16 mask = left >= PANEL ? (__mmask16)0xffff : kv_tail_mask(left);
    const __m512 b = a->bias ? kv_bf16x16_to_f32(_mm256_maskz_loadu_epi16(mask, a->bias + col))
                             : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r)
        _mm256_mask_storeu_epi16(a->y + (i + r) * a->y_row + col, mask,
                                 kv_f32x16_to_bf16(_mm512_add_ps(_mm512_load_ps(c + r * PANEL), b)));
}

/* How far ahead (in chunks of 1 KiB per panel) the first row block of a panel pair asks
   for the weights: tile loads start no hardware prefetch stream of their own, and at
   decode sizes every B tile is a fresh read from memory (~6% of a 64-token step's
   projections). Prefetches past a panel's end fetch the next panel, read next anyway. */
#define PREFETCH_CHUNKS 8

/* A B tile (16 lines of 64 bytes) into L1, ahead of its use. */
KV_INLINE void prefetch_tile(const uint16_t *b)
{
    for (int l = 0; l < 16; ++l) _mm_prefetch((const char *)b + 64 * l, _MM_HINT_T0);
}

/* Rows [i, i + rows) (rows <= 32) against panels [p, p + np) (np <= 2). `b_tail[j]` is
   the zero-padded last chunk of panel p + j (or NULL when k pairs fill whole chunks).
   `prefetch`: the first row block of these panels, which reads them from memory. */
static void block(const amx_args *a, int64_t i, int64_t rows, int64_t p, int np,
                  const uint16_t *const *b_tail, int prefetch)
{
    int64_t s0, s1 = 0;
    const uint16_t *a0 = a_rows(a, i, &s0);
    const uint16_t *a1 = rows > 16 ? a_rows(a, i + 16, &s1) : NULL;
    const uint16_t *b0 = a->panels + p * a->pairs * 2 * PANEL;
    const uint16_t *b1 = b0 + a->pairs * 2 * PANEL;
    const int64_t full = b_tail[0] ? a->chunks - 1 : a->chunks;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < a->chunks; ++c) {
        const uint16_t *w0 = c < full ? b0 + c * KCHUNK * PANEL : b_tail[0];
        if (prefetch) {
            prefetch_tile(b0 + (c + PREFETCH_CHUNKS) * KCHUNK * PANEL);
            if (np > 1) prefetch_tile(b1 + (c + PREFETCH_CHUNKS) * KCHUNK * PANEL);
        }
        _tile_loadd(4, a0 + c * KCHUNK, s0);
        _tile_loadd(6, w0, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (a1) {
            _tile_loadd(5, a1 + c * KCHUNK, s1);
            _tile_dpbf16ps(2, 5, 6);
        }
        if (np > 1) {
            const uint16_t *w1 = c < full ? b1 + c * KCHUNK * PANEL : b_tail[1];
            _tile_loadd(7, w1, 64);
            _tile_dpbf16ps(1, 4, 7);
            if (a1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    float c[4][16 * PANEL] __attribute__((aligned(64)));
    _tile_stored(0, c[0], 64);
    store_c(a, c[0], i, rows < 16 ? rows : 16, p);
    if (np > 1) {
        _tile_stored(1, c[1], 64);
        store_c(a, c[1], i, rows < 16 ? rows : 16, p + 1);
    }
    if (a1) {
        _tile_stored(2, c[2], 64);
        store_c(a, c[2], i + 16, rows - 16, p);
        if (np > 1) {
            _tile_stored(3, c[3], 64);
            store_c(a, c[3], i + 16, rows - 16, p + 1);
        }
    }
}

/* The last chunk of panel p, pairs past the panel's end zeroed, into out [16][16][2]. */
static void tail_chunk(const amx_args *a, int64_t p, uint16_t *out)
{
    const int64_t first = (a->chunks - 1) * (KCHUNK / 2), have = a->pairs - first;
    memset(out, 0, KCHUNK * PANEL * 2);
    memcpy(out, a->panels + (p * a->pairs + first) * 2 * PANEL, (size_t)(have * 2 * PANEL * 2));
}

void kv_amx_panels_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                        const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m, int64_t n,
                        int64_t k, int64_t p_begin, int64_t p_end)
{
    if (p_begin >= p_end || m <= 0) return;
    amx_args a = {x, x_row, panels, bias, y, y_row, m, n, k, (k + 1) / 2, (k + KCHUNK - 1) / KCHUNK};
    /* Rows a whole A tile cannot read from x: the last m % 16, or all when k is ragged. */
    a.pad_from = k % KCHUNK ? 0 : m - m % 16;
    uint16_t *pad = NULL;
    if (a.pad_from < m) {
        const int64_t rows = m - a.pad_from, width = a.chunks * KCHUNK;
        pad = aligned_alloc(64, (size_t)(((rows + 15) / 16 * 16 * width * 2 + 63) / 64 * 64));
        if (!pad) abort();
        memset(pad, 0, (size_t)((rows + 15) / 16 * 16 * width * 2));
        for (int64_t r = 0; r < rows; ++r)
            memcpy(pad + r * width, x + (a.pad_from + r) * x_row, (size_t)(k * 2));
    }
    a.pad = pad;
    uint16_t tails[2][KCHUNK * PANEL] __attribute__((aligned(64)));
    const int ragged = a.pairs % (KCHUNK / 2) != 0;
    configure();
    for (int64_t i0 = 0; i0 < m; i0 += ROW_BLOCK) {
        const int64_t i_end = m - i0 < ROW_BLOCK ? m : i0 + ROW_BLOCK;
        for (int64_t p = p_begin; p < p_end; p += 2) {
            const int np = p_end - p < 2 ? 1 : 2;
            const uint16_t *b_tail[2] = {NULL, NULL};
            if (ragged)
                for (int j = 0; j < np; ++j) {
                    tail_chunk(&a, p + j, tails[j]);
                    b_tail[j] = tails[j];
                }
            for (int64_t i = i0; i < i_end; i += 32)
                block(&a, i, i_end - i < 32 ? i_end - i : 32, p, np, b_tail, i == i0);
        }
    }
    _tile_release();
    free(pad);
}

#else /* built without AMX: kvrun_amx_init says so and kv_amx_ready stays 0 */

int kvrun_amx_init(void) { return AMX_NOT_BUILT; }

void kv_amx_panels_bf16(const uint16_t *x, int64_t x_row, const uint16_t *panels,
                        const uint16_t *bias, uint16_t *y, int64_t y_row, int64_t m, int64_t n,
                        int64_t k, int64_t p_begin, int64_t p_end)
{
    (void)x, (void)x_row, (void)panels, (void)bias, (void)y, (void)y_row, (void)m, (void)n;
    (void)k, (void)p_begin, (void)p_end;
    abort(); /* unreachable: kv_amx_ready() is 0 */
}

#endif
