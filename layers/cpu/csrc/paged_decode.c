/* Paged-attention decode on CPUs: one new query token per sequence attends over that
 * sequence's cached keys and values, read in place through its block table (no gather).
 *
 * Shapes (contiguous; float32 but for a bf16 cache, widened as it is read):
 *   q            (seqs, num_q, head_dim)
 *   cache        (2, num_blocks, block_size, num_kv, head_dim)   [0] keys, [1] values; float32,
 *                or bfloat16 (kv_bf16: half the bytes each step reads)
 *   block_tables (seqs, max_blocks) int64
 *   context_lens (seqs,) int64, each >= 1
 *   out          (seqs, num_q, head_dim)
 * Grouped-query attention: query heads [h*g, (h+1)*g) share KV head h, g = num_q / num_kv.
 *
 * Work is split over sequences with OpenMP (over sequence x KV head when there are fewer
 * sequences than threads). A task walks its sequence block by block: a block's tokens are
 * contiguous for all KV heads, so both passes (keys -> scores, then a softmax, then values
 * weighted by them) read each block token row by token row, in memory order. Blocks sit
 * anywhere in the cache, so while a token row is used, the same row of the next block is
 * asked for (one row at a time: prefetching a whole block at once stalled on full miss
 * buffers, and a per-head order defeated the hardware prefetcher; together 1.45x).
 * Head sizes must be a multiple of 16 (every common model's is); otherwise the function
 * returns -1 and the caller uses the PyTorch path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256

/* W cached values at element i of a float32 or (bf16 != 0) bfloat16 cache */
static inline __attribute__((always_inline)) vec load_kv(const void *base, int64_t i, const int bf16) {
    return bf16 ? load_bf16((const uint16_t *)base + i) : load((const float *)base + i);
}

static inline __attribute__((always_inline)) const void *kv_at(const void *base, int64_t i, const int bf16) {
    return bf16 ? (const void *)((const uint16_t *)base + i) : (const void *)((const float *)base + i);
}

/* Scores of query heads [h0, h1) x g against one block's n tokens. */
static inline __attribute__((always_inline)) void block_scores(
        const float *q, const void *k, int64_t n, int64_t h0, int64_t h1, int64_t g,
        int64_t hd, int64_t token_stride, float scale, float *scores, int64_t row_len,
        float *maxv, const void *next, const int bf16) {
    for (int64_t t = 0; t < n; t++) {
        if (next) /* the same token's row of the next block, a row at a time */
            for (int64_t i = h0 * hd; i < h1 * hd; i += 64 / sizeof(float))
                __builtin_prefetch(kv_at(next, t * token_stride + i, bf16));
        for (int64_t h = h0; h < h1; h++)
            for (int64_t j = 0; j < g; j++) {
                const float *qj = q + (h * g + j) * hd;
                const int64_t kh = t * token_stride + h * hd;
                vec a = splat(0.0f), b = splat(0.0f);
                for (int64_t d = 0; d < hd; d += 2 * W) {
                    a += load(qj + d) * load_kv(k, kh + d, bf16);
                    b += load(qj + d + W) * load_kv(k, kh + d + W, bf16);
                }
                const int64_t row = (h - h0) * g + j;
                const float s = hsum(a + b) * scale;
                scores[row * row_len + t] = s;
                maxv[row] = s > maxv[row] ? s : maxv[row];
            }
    }
}

/* out[h*g + j] += sum over one block's n tokens of p[row][t] * v[t][h] for heads [h0, h1):
 * token by token (the block's rows in memory order), the output rows staying in L1. */
static inline __attribute__((always_inline)) void block_values(
        const float *p, int64_t row_len, const void *v, int64_t n, int64_t h0, int64_t h1,
        int64_t g, int64_t hd, int64_t token_stride, float *out, const void *next, const int bf16) {
    for (int64_t t = 0; t < n; t++) {
        if (next) /* the same token's row of the next block */
            for (int64_t i = h0 * hd; i < h1 * hd; i += 64 / sizeof(float))
                __builtin_prefetch(kv_at(next, t * token_stride + i, bf16));
        for (int64_t h = h0; h < h1; h++)
            for (int64_t j = 0; j < g; j++) {
                const vec w = splat(p[((h - h0) * g + j) * row_len + t]);
                float *o = out + (h * g + j) * hd;
                const int64_t vh = t * token_stride + h * hd;
                for (int64_t c = 0; c < hd; c += W) store(o + c, load(o + c) + w * load_kv(v, vh + c, bf16));
            }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_512 1
/* The same two passes with 16-float registers for head sizes that are multiples of 16. Both
 * walk a block's token rows in memory order, every KV head of a row at once (a per-head walk
 * read two cache lines in six and left the hardware prefetcher behind: 2x slower here). */
static inline __attribute__((always_inline)) __m512 load16_kv(const void *base, int64_t i, const int bf16) {
    if (bf16) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

/* scores[row][t] of query rows (h - h0) * g + j against one block's n tokens; each key
 * head loaded once for its g query rows (from L1) */
static inline __attribute__((always_inline)) void block_scores16(
        const float *q, const void *k, int64_t n, int64_t h0, int64_t h1, const int g,
        const int hd, int64_t token_stride, float scale, float *scores, int64_t row_len,
        const void *next, const int bf16) {
    for (int64_t t = 0; t < n; t++) {
        if (next) /* the same token's row of the next block */
            for (int64_t i = h0 * hd; i < h1 * hd; i += 64 / sizeof(float))
                __builtin_prefetch(kv_at(next, t * token_stride + i, bf16));
        for (int64_t h = h0; h < h1; h++) {
            __m512 kv[MAX_HEAD_DIM / 16];
            _Pragma("GCC unroll 16") for (int d = 0; d < hd / 16; d++)
                kv[d] = load16_kv(k, t * token_stride + h * hd + d * 16, bf16);
            _Pragma("GCC unroll 8") for (int j = 0; j < g; j++) {
                const float *qj = q + (h * g + j) * hd;
                __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qj), kv[0]);
                _Pragma("GCC unroll 16") for (int d = 1; d < hd / 16; d++)
                    dot = _mm512_fmadd_ps(_mm512_loadu_ps(qj + d * 16), kv[d], dot);
                scores[((h - h0) * g + j) * row_len + t] = _mm512_reduce_add_ps(dot) * scale;
            }
        }
    }
}

/* out[row] += p[row][t] * v[t][h] over one block's n tokens, the output rows in L1 */
static inline __attribute__((always_inline)) void block_values16(
        const float *p, int64_t row_len, const void *v, int64_t n, int64_t h0, int64_t h1,
        const int g, const int hd, int64_t token_stride, float *out, const void *next,
        const int bf16) {
    for (int64_t t = 0; t < n; t++) {
        if (next)
            for (int64_t i = h0 * hd; i < h1 * hd; i += 64 / sizeof(float))
                __builtin_prefetch(kv_at(next, t * token_stride + i, bf16));
        for (int64_t h = h0; h < h1; h++) {
            __m512 vv[MAX_HEAD_DIM / 16];
            _Pragma("GCC unroll 16") for (int d = 0; d < hd / 16; d++)
                vv[d] = load16_kv(v, t * token_stride + h * hd + d * 16, bf16);
            _Pragma("GCC unroll 8") for (int j = 0; j < g; j++) {
                const __m512 w = _mm512_set1_ps(p[((h - h0) * g + j) * row_len + t]);
                float *o = out + (h * g + j) * hd;
                _Pragma("GCC unroll 16") for (int d = 0; d < hd / 16; d++)
                    _mm512_storeu_ps(o + d * 16, _mm512_fmadd_ps(w, vv[d], _mm512_loadu_ps(o + d * 16)));
            }
        }
    }
}

/* each row's maximum, vectorised */
static void row_maxima(const float *scores, int64_t rows, int64_t len, float *maxv) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = scores + r * len;
        __m512 m = _mm512_set1_ps(-INFINITY);
        int64_t t = 0;
        for (; t + 16 <= len; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + t));
        if (t < len) m = _mm512_mask_max_ps(m, (__mmask16)((1u << (len - t)) - 1), m, _mm512_loadu_ps(row + t));
        maxv[r] = _mm512_reduce_max_ps(m);
    }
}
#else
#define HAVE_512 0
#endif

/* softmax of each of `rows` score rows in place (len values each) */
static void softmax_rows(float *scores, int64_t rows, int64_t len, const float *maxv) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = scores + r * len;
        const vec m = splat(maxv[r]);
        vec total = splat(0.0f);
        int64_t t = 0;
        for (; t + W <= len; t += W) {
            const vec e = vexp(load(row + t) - m);
            store(row + t, e);
            total += e;
        }
        float sum = hsum(total);
        for (; t < len; t++) {
            row[t] = expf(row[t] - maxv[r]);
            sum += row[t];
        }
        const float inv = 1.0f / sum;
        for (t = 0; t < len; t++) row[t] *= inv;
    }
}

/* Soft-capping (Gemma 2): each score s becomes cap * tanh(s / cap); rows' maxima after it. */
static void cap_scores(float *scores, int64_t rows, int64_t len, float cap, float *maxv) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = scores + r * len, m = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            row[t] = cap * tanhf(row[t] / cap);
            m = row[t] > m ? row[t] : m;
        }
        maxv[r] = m;
    }
}

/* The blocks of positions [lo, len) of a sequence, a part of a block at either end: for each,
 * the position it starts at, its first token's offset in its block, how many tokens. */
#define FOR_SPANS(lo, len, block_size, start, b, off, n) \
    for (int64_t start = (lo), b, off, n; \
         start < (len) && ((b = start / (block_size)), (off = start % (block_size)), \
                           (n = ((block_size) - off < (len) - start ? (block_size) - off : (len) - start)), 1); \
         start += n)

/* One task: KV heads [h0, h1) of one sequence, over its positions [lo, len) (lo > 0: a sliding
 * window); cap > 0 soft-caps the scores. */
static inline __attribute__((always_inline)) void attend(
        const float *q, const void *keys, const void *values, const int64_t *table,
        int64_t lo, int64_t len, int64_t h0, int64_t h1, int64_t g, int64_t hd,
        int64_t block_size, int64_t block_stride, int64_t token_stride, float scale, float cap,
        float *scores, float *out, const int bf16) {
    const int64_t rows = (h1 - h0) * g, span = len - lo;
    float maxv[MAX_GROUP * 64];
    for (int64_t r = 0; r < rows; r++) maxv[r] = -INFINITY;
#define BLOCK(base) kv_at(base, table[b] * block_stride + off * token_stride, bf16)
#define NEXT(base) (start + n < len ? kv_at(base, table[b + 1] * block_stride, bf16) : NULL)
#if HAVE_512
    if (hd % 16 == 0 && hd <= MAX_HEAD_DIM) {
        FOR_SPANS(lo, len, block_size, start, b, off, n)
            block_scores16(q, BLOCK(keys), n, h0, h1, g, hd, token_stride, scale,
                           scores + start - lo, span, NEXT(keys), bf16);
        if (cap > 0.0f)
            cap_scores(scores, rows, span, cap, maxv);
        else
            row_maxima(scores, rows, span, maxv);
        softmax_rows(scores, rows, span, maxv);
        memset(out + h0 * g * hd, 0, sizeof(float) * rows * hd);
        FOR_SPANS(lo, len, block_size, start, b, off, n)
            block_values16(scores + start - lo, span, BLOCK(values), n, h0, h1, g, hd,
                           token_stride, out, NEXT(values), bf16);
        return;
    }
#endif
    FOR_SPANS(lo, len, block_size, start, b, off, n)
        block_scores(q, BLOCK(keys), n, h0, h1, g, hd, token_stride, scale, scores + start - lo,
                     span, maxv, NEXT(keys), bf16);
    if (cap > 0.0f)
        cap_scores(scores, rows, span, cap, maxv);
    softmax_rows(scores, rows, span, maxv);
    memset(out + h0 * g * hd, 0, sizeof(float) * rows * hd);
    FOR_SPANS(lo, len, block_size, start, b, off, n)
        block_values(scores + start - lo, span, BLOCK(values), n, h0, h1, g, hd, token_stride,
                     out, NEXT(values), bf16);
#undef BLOCK
#undef NEXT
}

/* Constant group and head sizes let the compiler unroll the inner loops. */
static void attend_task(const float *q, const void *keys, const void *values,
                        const int64_t *table, int64_t lo, int64_t len, int64_t h0, int64_t h1,
                        int64_t g, int64_t hd, int64_t block_size, int64_t block_stride,
                        int64_t token_stride, float scale, float cap, float *scores, float *out,
                        int bf16) {
#define CASE(G, HD, BF) if (g == G && hd == HD && bf16 == BF) { attend(q, keys, values, table, lo, \
        len, h0, h1, G, HD, block_size, block_stride, token_stride, scale, cap, scores, out, BF); return; }
#define CASES(BF) CASE(1, 64, BF) CASE(2, 64, BF) CASE(3, 64, BF) CASE(4, 64, BF) CASE(8, 64, BF) \
        CASE(1, 128, BF) CASE(2, 128, BF) CASE(4, 128, BF) CASE(8, 128, BF)
    CASES(0) CASES(1)
#undef CASES
#undef CASE
    if (bf16)
        attend(q, keys, values, table, lo, len, h0, h1, g, hd, block_size, block_stride,
               token_stride, scale, cap, scores, out, 1);
    else
        attend(q, keys, values, table, lo, len, h0, h1, g, hd, block_size, block_stride,
               token_stride, scale, cap, scores, out, 0);
}

/* window > 0: each new token sees its sequence's last `window` positions only (sliding-window
 * layers); softcap > 0: scores soft-capped before the softmax. Returns 0; -1 when the shapes
 * are outside what this kernel handles; -2 out of memory. */
int paged_decode_attention(const float *q, const void *cache, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, int64_t seqs, int64_t num_q,
                           int64_t num_kv, int64_t hd, int64_t num_blocks, int64_t block_size,
                           int64_t max_blocks, float scale, int kv_bf16, int threads,
                           int64_t window, float softcap) {
    if (num_kv <= 0 || num_kv > 64 || num_q % num_kv || num_q / num_kv > MAX_GROUP ||
        hd > MAX_HEAD_DIM || hd % (2 * W))
        return -1;
    const int64_t g = num_q / num_kv, token_stride = num_kv * hd, block_stride = block_size * token_stride;
    const void *keys = cache, *values = kv_at(cache, num_blocks * block_stride, kv_bf16);
    /* tasks: whole sequences, or sequence x KV head when that leaves threads idle */
    const int64_t parts = seqs >= 2 * threads ? 1 : num_kv, per_part = num_kv / parts;
    int64_t longest = 1;
    for (int64_t b = 0; b < seqs; b++) longest = context_lens[b] > longest ? context_lens[b] : longest;
    if (window > 0 && window < longest) longest = window;  /* the scores of one task's span */
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * per_part * g * longest);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < seqs * parts; task++) {
            const int64_t b = task / parts, h0 = (task % parts) * per_part;
            const int64_t len = context_lens[b], lo = window > 0 && len > window ? len - window : 0;
            if (scores)
                attend_task(q + b * num_q * hd, keys, values, block_tables + b * max_blocks,
                            lo, len, h0, h0 + per_part, g, hd, block_size, block_stride,
                            token_stride, scale, softcap, scores, out + b * num_q * hd, kv_bf16);
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
