/* A whole decode step of a Llama-family model in one call, float32 or bfloat16.
 *
 * For a few decode tokens a step is ~150 small kernels around the matmuls, and calling
 * them one by one from Python costs about as much as the matmuls themselves. Here the
 * whole step runs inside one parallel region: each phase splits its work among the
 * threads and a barrier separates it from the next. The barriers are our own (spin
 * briefly, then sleep), whatever OMP_WAIT_POLICY says: OpenMP's either sleep at once at
 * each of the step's ~200 barriers (PASSIVE: 40% slower on a quiet machine) or spin
 * for long (the default: 5-20x slower when another process wants one of the cores).
 * Every phase runs the same row and item functions as the op-level kernels, in the same
 * order, so the hidden states are bit for bit those of the op-by-op native path.
 *
 * Weights are packed into 16-row panels (packed.c, packed_bf16.c), the embedding table
 * too. Activations, the residual stream and the cache are in the model's dtype, rounded
 * where the op-by-op path rounds them.
 *
 * Per layer: qkv = h Wqkv^T (+b); per (request, kv head): RMS-norm its q heads and k
 * per head where the model has those norms (Qwen3), rotate them, write k and v into the
 * cache slot, attend over the cached rows; x = attn Wo^T;
 * residual += x, h = norm(residual); gate|up = h Wgu^T, act = silu(gate) up;
 * x = act Wdown^T; residual += x, h = norm(residual) with the next layer's weight.
 *
 * LoRA adapters (the add_lora op, lora.c): where the step is given each token's adapter
 * slot, each of the four projections gets its tokens' deltas, added in place right after
 * it, before anything reads it (gate|up's before the silu). The shrink (x A_s^T) of qkv and
 * gate|up runs on each row as soon as its norm is done, in the norm's phase; that of o and
 * down (whose inputs are written by columns or heads) in a phase of its own after the
 * input's; the expand runs on the columns of the output each thread has just computed.
 * lora.c's arithmetic per element does not depend on how the work is split, so the
 * projections are bit for bit those of the op-by-op path's add_lora.
 *
 * Quantized matrices (GGUF, AWQ: quant.c's panels; kv_decoder_layer.quant): the thread
 * that writes a row (or a kv head's columns of attn, or a block-aligned share of act) of
 * a quantized projection's input quantizes it to int8 per block of 32 (kv_quantize_blocks)
 * before the barrier; the projection then runs kv_quant_panels on its share of panels.
 * quant.c's result for a row does not depend on the batch or the split either, so the
 * step is bit for bit the op-by-op quantized path.
 */
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "kvrun_cpu.h"

/* The projections adapters may change, in the order of kv_decoder_layer's lora arrays. */
enum { LORA_QKV, LORA_O, LORA_GATE_UP, LORA_DOWN, LORA_MATRICES };

typedef struct {
    const void *input_norm, *qkv, *qkv_bias, *o, *post_norm, *gate_up, *down; /* matrices packed */
    void *key_cache, *value_cache; /* [Hk, num_blocks, block_size, D] via the model's strides */
    const void *q_norm, *k_norm;   /* [D] per-head norms before the rotation, or NULL */
    /* Per projection, every adapter slot's A [S, R, in] and B [S, out, R] (R the
       kv_decoder's lora_rank), contiguous in the model's dtype; NULL: no adapters on it. */
    const void *lora_a[LORA_MATRICES], *lora_b[LORA_MATRICES];
    /* Per projection (LORA_QKV ..): 0, its matrix is float panels in the model's dtype;
       else quant.c's format code of its quantized panels (GGUF, AWQ). */
    int64_t quant[LORA_MATRICES];
} kv_decoder_layer;

/* Layout of every field: 8 bytes (kvrun_cpu.native.decoder mirrors it with ctypes). */
typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab;
    double eps, scale;
    const void *embed;       /* [vocab, hidden], packed */
    const void *final_norm;  /* [hidden] */
    const float *cos_sin;    /* [max_pos, head_dim]: cos | sin */
    int64_t max_pos;
    int64_t c_head, c_block, c_slot, block_size, num_blocks;
    const kv_decoder_layer *layers;
    int64_t dtype; /* KV_F32 or KV_BF16: weights, activations and cache */
    int64_t lora_slots;                   /* S: adapter slots (0: no adapters attached) */
    int64_t lora_rank[LORA_MATRICES];     /* each projection's slot rank R */
    const float *lora_scales;             /* [S] */
    int64_t embed_quant; /* 0: embed is float panels; else quant.c's format code */
} kv_decoder;

/* A sense-reversing barrier for the step's threads: spin for up to SPIN_NS (the phases
   of a step end within microseconds of each other on a quiet machine), then sleep on a
   futex, so a thread whose partner lost its core to another process gives up its own
   and the scheduler can move the partner there. */
typedef struct {
    atomic_int arrived;
    atomic_int sense;
    atomic_int sleepers;
    int threads;
} barrier;

#ifndef SPIN_NS
#define SPIN_NS 50000
#endif

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
static void futex_wait(atomic_int *addr, int value)
{
    syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void futex_wake_all(atomic_int *addr)
{
    syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
}
#else /* no futex: keep yielding instead of sleeping */
static void futex_wait(atomic_int *addr, int value)
{
    (void)addr;
    (void)value;
    sched_yield();
}
static void futex_wake_all(atomic_int *addr) { (void)addr; }
#endif

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void barrier_wait(barrier *b, int *local_sense)
{
    const int sense = !*local_sense;
    *local_sense = sense;
    if (atomic_fetch_add(&b->arrived, 1) == b->threads - 1) {
        atomic_store(&b->arrived, 0);
        atomic_store(&b->sense, sense);
        if (atomic_load(&b->sleepers) > 0) futex_wake_all(&b->sense);
        return;
    }
    const int64_t start = now_ns();
    for (int i = 1; atomic_load_explicit(&b->sense, memory_order_acquire) != sense; ++i) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if ((i & 255) == 0 && now_ns() - start > SPIN_NS) {
            atomic_fetch_add(&b->sleepers, 1);
            while (atomic_load(&b->sense) != sense) futex_wait(&b->sense, !sense);
            atomic_fetch_sub(&b->sleepers, 1);
            return;
        }
    }
}

typedef struct {
    const kv_decoder *md;
    const int64_t *tokens, *positions, *slots; /* [m] */
    const int32_t *tables;                     /* [m, t_row] */
    int64_t t_row;
    const int32_t *seq_lens; /* [m] */
    int64_t m;
    void *hidden; /* [m, H]: the normed output */
    /* scratch, each [m, ...] contiguous, in the model's dtype */
    char *residual, *x, *qkv, *q, *attn, *gate_up, *act;
    int dt;
    int64_t es; /* bytes per element */
    barrier *sync;
    /* LoRA: each token's slot [m], or NULL when no token of the step has an adapter; the
       tokens grouped by slot (kv_lora_group), each token's grouped position [m], and the
       shrink's output [R, m] (one projection at a time: each is expanded before the next
       shrink starts) */
    const int64_t *lora_slots;
    int64_t *lora_order, *lora_starts, *lora_pos;
    float *lora_buf;
    /* A quantized projection's input, quantized row by row (kv_quantize_blocks) where it
       is written, before the barrier that precedes the projection: [0] of h (qkv,
       gate_up), [1] of attn (o) and act (down). Rows [m, k], k that projection's. */
    struct {
        int8_t *q;        /* [m, k] */
        float *s;         /* [m, k/32, 2] */
        int32_t *halves;  /* [m, k/32, 2] */
        int32_t *sums;    /* [m, k/32] */
    } qin[2];
} step_args;

/* Whether the step adds adapters to projection `mat` of `layer`. */
static int has_lora(const step_args *s, const kv_decoder_layer *layer, int mat)
{
    return s->lora_slots && layer->lora_a[mat];
}

/* add_lora's arguments for projection `mat` of `layer`: y [m, n] = x [m, k] W^T, in place. */
static kv_lora_args lora_args(const step_args *s, const kv_decoder_layer *layer, int mat,
                              const void *x, int64_t k, void *y, int64_t n)
{
    const kv_lora_args a = {.y = y, .x = x, .a = layer->lora_a[mat], .b = layer->lora_b[mat],
                            .y_row = n, .x_row = k, .scales = s->md->lora_scales,
                            .slots = s->lora_slots, .order = s->lora_order,
                            .starts = s->lora_starts, .buf = s->lora_buf, .out = y, .o_row = n,
                            .tokens = s->m, .n = n, .k = k, .r = s->md->lora_rank[mat],
                            .num_slots = s->md->lora_slots, .dtype = s->dt};
    return a;
}

/* The shrink of row r (its token's grouped position), if its token has an adapter. */
static void shrink_row(const kv_lora_args *a, const step_args *s, int64_t r)
{
    const int64_t p = s->lora_pos[r];
    if (p < s->lora_starts[s->md->lora_slots]) kv_lora_shrink(a, p, p + 1);
}

/* The shrink of every adapted token, shared among the threads. */
static void shrink_part(const step_args *s, const kv_decoder_layer *layer, int mat, const void *x,
                        int64_t k, int64_t n, int worker, int workers)
{
    const kv_lora_args a = lora_args(s, layer, mat, x, k, 0, n);
    int64_t begin, end;
    kv_split(s->lora_starts[s->md->lora_slots], 1, worker, workers, &begin, &end);
    if (begin < end) kv_lora_shrink(&a, begin, end);
}

/* Which of s->qin a projection reads: 0 for h, 1 for attn and act. */
static int quant_input_of(int mat) { return mat == LORA_O || mat == LORA_DOWN; }

/* Blocks [b_begin, b_end) of row r of x [m, k], projection `mat`'s input, quantized. */
static void quantize_part(const step_args *s, int mat, const void *x, int64_t k, int64_t r,
                          int64_t b_begin, int64_t b_end)
{
    const int which = quant_input_of(mat);
    const int64_t kb = k / 32;
    kv_quantize_blocks((const char *)x + r * k * s->es, b_begin, b_end, s->dt,
                       s->qin[which].q + r * k, s->qin[which].s + r * kb * 2,
                       s->qin[which].halves + r * kb * 2, s->qin[which].sums + r * kb);
}

/* h = norm(residual (+= x)) row by row; then, where `next` (the layer whose projection
   `mat` reads h next; NULL: none) has adapters, the shrink of each row. */
static void residual_norm(const step_args *s, const void *weight, int worker, int workers,
                          int add, const kv_decoder_layer *next, int mat, int64_t n)
{
    const int64_t H = s->md->hidden;
    const int lora = next && has_lora(s, next, mat);
    const kv_lora_args a = lora ? lora_args(s, next, mat, s->hidden, H, 0, n) : (kv_lora_args){0};
    const int quant = next && next->quant[mat];
    for (int64_t r = worker; r < s->m; r += workers) {
        char *res = s->residual + r * H * s->es;
        if (add) kv_add_row(s->x + r * H * s->es, res, H, s->dt);
        kv_rms_norm_row(res, weight, (char *)s->hidden + r * H * s->es, H, (float)s->md->eps, s->dt);
        if (lora) shrink_row(&a, s, r);
        if (quant) quantize_part(s, mat, s->hidden, H, r, 0, H / 32);
    }
}

/* y[:, 16 p_begin : 16 p_end] = x W^T (+ bias), W (n rows) projection `mat` of `layer`:
   float panels, or quantized ones (reading x as s->qin quantized it). */
static void panels(const step_args *s, const kv_decoder_layer *layer, int mat, const void *x,
                   const void *w, const void *bias, void *y, int64_t n, int64_t k, int64_t p_begin,
                   int64_t p_end)
{
    if (p_begin >= p_end) return;
    const int64_t format = layer->quant[mat];
    if (format) {
        const int which = quant_input_of(mat);
        const int32_t *xh = format == KV_QUANT_Q6    ? s->qin[which].halves
                            : format > KV_QUANT_AWQ ? s->qin[which].sums
                                                    : 0;
        const kv_quant_args a = {s->qin[which].q, s->qin[which].s, xh, w, bias, y, n, s->m, n, k,
                                 (int)format, s->dt};
        kv_quant_panels(&a, p_begin, p_end);
    } else if (s->dt == KV_BF16) {
        kv_packed_panels_bf16(x, k, w, bias, y, n, s->m, n, k, p_begin, p_end);
    } else {
        const kv_packed_args a = {x, k, w, bias, y, n, s->m, n, k};
        kv_packed_panels(&a, p_begin, p_end);
    }
}

/* This thread's panels of y = x W^T (+ bias), then, where projection `mat` of `layer` has
   adapters, their deltas on those columns (the shrink done before). */
static void linear_part(const step_args *s, const kv_decoder_layer *layer, int mat, const void *x,
                        const void *w, const void *bias, void *y, int64_t n, int64_t k, int worker,
                        int workers)
{
    int64_t begin, end;
    kv_split((n + 15) / 16, 1, worker, workers, &begin, &end);
    panels(s, layer, mat, x, w, bias, y, n, k, begin, end);
    if (begin < end && has_lora(s, layer, mat)) {
        const kv_lora_args a = lora_args(s, layer, mat, x, k, y, n);
        kv_lora_expand(&a, 16 * begin, 16 * end < n ? 16 * end : n);
    }
}

static void attention_part(const step_args *s, const kv_decoder_layer *layer, int worker,
                           int workers)
{
    const kv_decoder *md = s->md;
    const int64_t D = md->head_dim, Hq = md->num_heads, Hk = md->num_kv_heads, G = Hq / Hk;
    const int64_t width = (Hq + 2 * Hk) * D, es = s->es;
    const kv_decode_args a = {s->q,          Hq * D,      D,           layer->key_cache,
                              layer->value_cache, md->c_head, md->c_block, md->c_slot,
                              s->tables,     s->t_row,    s->seq_lens, s->m,
                              Hq,            Hk,          D,           md->block_size,
                              (float)md->scale, s->attn,  Hq * D,      D,
                              s->dt};
    int64_t begin, end;
    kv_decode_range(&a, worker, workers, &begin, &end);
    for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / Hk, h = item % Hk;
        char *row = s->qkv + r * width * es; /* this item alone owns its heads of the row */
        const float *cs = md->cos_sin + s->positions[r] * D;
        if (layer->q_norm) /* in place, as the op-by-op path norms before it rotates */
            for (int64_t g = h * G; g < (h + 1) * G; ++g)
                kv_rms_norm_row(row + g * D * es, layer->q_norm, row + g * D * es, D,
                                (float)md->eps, s->dt);
        if (layer->k_norm)
            kv_rms_norm_row(row + (Hq + h) * D * es, layer->k_norm, row + (Hq + h) * D * es, D,
                            (float)md->eps, s->dt);
        for (int64_t g = h * G; g < (h + 1) * G; ++g)
            kv_rotate_head(row + g * D * es, s->q + (r * Hq + g) * D * es, cs, D / 2, s->dt);
        const int64_t slot = s->slots[r], blk = slot / md->block_size, off = slot % md->block_size;
        const int64_t dst = (h * md->c_head + blk * md->c_block + off * md->c_slot) * es;
        kv_rotate_head(row + (Hq + h) * D * es, (char *)layer->key_cache + dst, cs, D / 2, s->dt);
        memcpy((char *)layer->value_cache + dst, row + (Hq + Hk + h) * D * es, (size_t)(D * es));
        kv_decode_item(&a, r, h);
        if (layer->quant[LORA_O]) /* its G heads: whole blocks (NativeDecoder checks) */
            quantize_part(s, LORA_O, s->attn, Hq * D, r, h * G * D / 32, (h + 1) * G * D / 32);
    }
}

static void step_body(const step_args *s, int worker, int workers)
{
    const kv_decoder *md = s->md;
    const int64_t H = md->hidden, I = md->intermediate, m = s->m, es = s->es;
    const int64_t qkv_width = (md->num_heads + 2 * md->num_kv_heads) * md->head_dim;
    const int64_t attn_width = md->num_heads * md->head_dim;
    int sense = 0;
    for (int64_t r = worker; r < m; r += workers)
        if (md->embed_quant)
            kv_quant_row(md->embed, (int)md->embed_quant, H, s->tokens[r], s->residual + r * H * es, s->dt);
        else
            kv_packed_row(md->embed, H, s->tokens[r], s->residual + r * H * es, s->dt);
    residual_norm(s, md->layers[0].input_norm, worker, workers, 0, md->layers, LORA_QKV, qkv_width);
    barrier_wait(s->sync, &sense);
    for (int64_t l = 0; l < md->num_layers; ++l) {
        const kv_decoder_layer *layer = md->layers + l;
        linear_part(s, layer, LORA_QKV, s->hidden, layer->qkv, layer->qkv_bias, s->qkv, qkv_width,
                    H, worker, workers);
        barrier_wait(s->sync, &sense);
        attention_part(s, layer, worker, workers);
        barrier_wait(s->sync, &sense);
        if (has_lora(s, layer, LORA_O)) { /* the same branch on every thread */
            shrink_part(s, layer, LORA_O, s->attn, attn_width, H, worker, workers);
            barrier_wait(s->sync, &sense);
        }
        linear_part(s, layer, LORA_O, s->attn, layer->o, 0, s->x, H, attn_width, worker, workers);
        barrier_wait(s->sync, &sense);
        residual_norm(s, layer->post_norm, worker, workers, 1, layer, LORA_GATE_UP, 2 * I);
        barrier_wait(s->sync, &sense);
        { /* gate panels [b, e) and their up panels, then act for those columns
             (I is a multiple of 16: NativeDecoder checks); where down is quantized, whole
             blocks of 32 columns, quantized as soon as act has them */
            const int quant_down = layer->quant[LORA_DOWN] != 0;
            int64_t b, e;
            kv_split(I / 16, quant_down ? 2 : 1, worker, workers, &b, &e);
            if (b < e) {
                panels(s, layer, LORA_GATE_UP, s->hidden, layer->gate_up, 0, s->gate_up, 2 * I, H, b, e);
                panels(s, layer, LORA_GATE_UP, s->hidden, layer->gate_up, 0, s->gate_up, 2 * I, H,
                       I / 16 + b, I / 16 + e);
                if (has_lora(s, layer, LORA_GATE_UP)) { /* the deltas before the silu */
                    const kv_lora_args a = lora_args(s, layer, LORA_GATE_UP, s->hidden, H, s->gate_up, 2 * I);
                    kv_lora_expand(&a, 16 * b, 16 * e);
                    kv_lora_expand(&a, I + 16 * b, I + 16 * e);
                }
                for (int64_t r = 0; r < m; ++r) {
                    const char *gu = s->gate_up + (r * 2 * I + 16 * b) * es;
                    kv_silu_mul(gu, gu + I * es, s->act + (r * I + 16 * b) * es, 16 * (e - b), s->dt);
                    if (quant_down) quantize_part(s, LORA_DOWN, s->act, I, r, b / 2, e / 2);
                }
            }
        }
        barrier_wait(s->sync, &sense);
        if (has_lora(s, layer, LORA_DOWN)) {
            shrink_part(s, layer, LORA_DOWN, s->act, I, H, worker, workers);
            barrier_wait(s->sync, &sense);
        }
        linear_part(s, layer, LORA_DOWN, s->act, layer->down, 0, s->x, H, I, worker, workers);
        barrier_wait(s->sync, &sense);
        const kv_decoder_layer *next = l + 1 < md->num_layers ? layer + 1 : 0;
        residual_norm(s, next ? next->input_norm : md->final_norm, worker, workers, 1, next,
                      LORA_QKV, qkv_width);
        barrier_wait(s->sync, &sense);
    }
}

/* Check what the kernels would otherwise read or write unchecked. Returns 0, or a code
   (kvrun_cpu.native.decoder.STEP_ERRORS) with *where set to the offending row. */
static int64_t validate(const kv_decoder *md, const int64_t *tokens, const int64_t *positions,
                        const int64_t *slots, const int32_t *tables, int64_t t_row,
                        const int32_t *seq_lens, const int64_t *lora_slots, int64_t m,
                        int64_t *where)
{
    for (int64_t r = 0; r < m; ++r) {
        *where = r;
        if (lora_slots && (lora_slots[r] < -1 || lora_slots[r] >= md->lora_slots)) return 6;
        if (tokens[r] < 0 || tokens[r] >= md->vocab) return 1;
        if (positions[r] < 0 || positions[r] >= md->max_pos) return 2;
        if (slots[r] < 0 || slots[r] >= md->num_blocks * md->block_size) return 3;
        if (seq_lens[r] < 1 || (seq_lens[r] + md->block_size - 1) / md->block_size > t_row) return 4;
        for (int64_t b = 0; b < (seq_lens[r] + md->block_size - 1) / md->block_size; ++b)
            if (tables[r * t_row + b] < 0 || tables[r * t_row + b] >= md->num_blocks) return 5;
    }
    return 0;
}

/* Bytes of the dtype scratch before the LoRA scratch (64-byte aligned). */
static int64_t lora_scratch_offset(const kv_decoder *md, int64_t m)
{
    const int64_t q = md->num_heads * md->head_dim, kv = md->num_kv_heads * md->head_dim;
    const int64_t es = md->dtype == KV_BF16 ? 2 : 4;
    const int64_t bytes = m * (2 * md->hidden + (q + 2 * kv) + 2 * q + 3 * md->intermediate) * es;
    return (bytes + 63) / 64 * 64;
}

/* Bytes of the scratch before the quantized inputs (64-byte aligned): the dtype scratch
   and the LoRA scratch. */
static int64_t quant_scratch_offset(const kv_decoder *md, int64_t m)
{
    int64_t rank = 0;
    for (int i = 0; i < LORA_MATRICES; ++i) rank = md->lora_rank[i] > rank ? md->lora_rank[i] : rank;
    const int64_t lora = (int64_t)sizeof(int64_t) * (2 * m + md->lora_slots + 2) +
                         (int64_t)sizeof(float) * rank * m;
    return (lora_scratch_offset(md, m) + lora + 63) / 64 * 64;
}

/* The widest input of a quantized projection (0: none is quantized). */
static int64_t quant_width(const kv_decoder *md)
{
    const int64_t widths[LORA_MATRICES] = {md->hidden, md->num_heads * md->head_dim, md->hidden,
                                           md->intermediate};
    int64_t k = 0;
    for (int64_t l = 0; l < md->num_layers; ++l)
        for (int i = 0; i < LORA_MATRICES; ++i)
            if (md->layers[l].quant[i] && widths[i] > k) k = widths[i];
    return k;
}

/* Bytes of one of step_args' qin for m rows of up to k columns (64-byte aligned). */
static int64_t quant_input_bytes(int64_t m, int64_t k)
{
    return (m * k + 63) / 64 * 64 + m * (k / 32) * (int64_t)(2 * sizeof(float) + 3 * sizeof(int32_t));
}

/* lora_slots: each token's adapter slot in [-1, md->lora_slots) (-1: none), or NULL. */
int64_t kvrun_decode_step(const kv_decoder *md, const int64_t *tokens, const int64_t *positions,
                          const int64_t *slots, const int32_t *tables, int64_t t_row,
                          const int32_t *seq_lens, const int64_t *lora_slots, int64_t m,
                          void *hidden, void *scratch, int64_t *where, int workers)
{
    const int64_t code =
        validate(md, tokens, positions, slots, tables, t_row, seq_lens, lora_slots, m, where);
    if (code) return code;
    const int64_t H = md->hidden, I = md->intermediate, es = md->dtype == KV_BF16 ? 2 : 4;
    const int64_t q = md->num_heads * md->head_dim, kv = md->num_kv_heads * md->head_dim;
    step_args s = {.md = md, .tokens = tokens, .positions = positions, .slots = slots,
                   .tables = tables, .t_row = t_row, .seq_lens = seq_lens, .m = m,
                   .hidden = hidden, .dt = (int)md->dtype, .es = es};
    s.residual = scratch;
    s.x = s.residual + m * H * es;
    s.qkv = s.x + m * H * es;
    s.q = s.qkv + m * (q + 2 * kv) * es;
    s.attn = s.q + m * q * es;
    s.gate_up = s.attn + m * q * es;
    s.act = s.gate_up + m * 2 * I * es;
    if (lora_slots) {
        const int64_t S = md->lora_slots;
        s.lora_order = (int64_t *)((char *)scratch + lora_scratch_offset(md, m));
        s.lora_starts = s.lora_order + m;
        s.lora_pos = s.lora_starts + S + 2;
        s.lora_buf = (float *)(s.lora_pos + m);
        kv_lora_group(lora_slots, m, S, s.lora_order, s.lora_starts);
        for (int64_t p = 0; p < m; ++p) s.lora_pos[s.lora_order[p]] = p;
        if (s.lora_starts[S] > 0) s.lora_slots = lora_slots; /* else: no token has one */
    }
    const int64_t qk = quant_width(md);
    if (qk) {
        char *base = (char *)scratch + quant_scratch_offset(md, m);
        for (int i = 0; i < 2; ++i) {
            char *at = base + i * quant_input_bytes(m, qk);
            s.qin[i].q = (int8_t *)at;
            s.qin[i].s = (float *)(at + (m * qk + 63) / 64 * 64);
            s.qin[i].halves = (int32_t *)(s.qin[i].s + m * (qk / 32) * 2);
            s.qin[i].sums = s.qin[i].halves + m * (qk / 32) * 2;
        }
    }
    barrier sync = {0, 0, 0, 1};
    s.sync = &sync;
    if (workers <= 1) {
        step_body(&s, 0, 1);
        return 0;
    }
#pragma omp parallel num_threads(workers)
    {
#pragma omp single
        sync.threads = omp_get_num_threads(); /* OpenMP may give fewer than asked */
        /* the single's implicit barrier publishes it */
        step_body(&s, omp_get_thread_num(), omp_get_num_threads());
    }
    return 0;
}

/* Elements (of the model's dtype) of scratch kvrun_decode_step needs for m tokens (with
   room for the adapters' grouping and shrink, as attached when it is called). */
int64_t kvrun_decode_scratch(const kv_decoder *md, int64_t m)
{
    const int64_t es = md->dtype == KV_BF16 ? 2 : 4, qk = quant_width(md);
    const int64_t bytes = quant_scratch_offset(md, m) + (qk ? 2 * quant_input_bytes(m, qk) : 0);
    return (bytes + es - 1) / es;
}
