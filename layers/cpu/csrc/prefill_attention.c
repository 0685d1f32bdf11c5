/* Causal attention of a chunk of new tokens over its context, on CPUs (prefill).
 *
 * Query i of the chunk (i < n) sits at position offset + i and attends keys 0..offset + i of
 * the ctx = offset + n context. Rows of q, k, v and out may be any stride apart (q, k and v
 * are usually slices of the fused qkv output); heads are contiguous within a row.
 *   q (n, num_q, hd), k and v (ctx, num_kv, hd), out (n, num_q, hd), float32.
 * Grouped-query attention: query head h reads KV head h / (num_q / num_kv).
 *
 * Keys are first packed per KV head into 16-key panels (hd x 16, zero past the end), so
 * that scores of up to 6 queries x 16 keys come from the shared micro-kernel; a row's
 * softmax follows (its causal limit masks the rest of its last panel and beyond), then the
 * probabilities times the values, again through the micro-kernel (values read in place,
 * 16 features at a time). Tasks are (query head, block of QB queries), handed out
 * dynamically: causal blocks near the end of the chunk cost more. With a sliding window
 * (window > 0) a query sees the keys at positions > its own - window, and a block skips the
 * panels before its first query's window; softcap > 0 soft-caps the scaled scores (Gemma 2).
 * hd must be a multiple of 16, and the CPU must have AVX2 + FMA; otherwise -1 (torch runs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <omp.h>

#include "microkernel.h"
#include "vec.h"

#define QB 48 /* queries per task: 8 micro-kernel row blocks */

/* keys of one KV head into panels: packed[p][d][c] = k[(16p + c) * stride + d], 0 past ctx */
static void pack_keys(const float *k, int64_t stride, int64_t ctx, int64_t hd, float *packed,
                      int64_t panel) {
    float *dst = packed + panel * hd * NR;
    for (int64_t c = 0; c < NR; c++) {
        const int64_t t = panel * NR + c;
        for (int64_t d = 0; d < hd; d++) dst[d * NR + c] = t < ctx ? k[t * stride + d] : 0.0f;
    }
}

/* scores row (len keys) -> softmax probabilities in place over keys [lo, valid), 0 elsewhere;
 * cap > 0 soft-caps the scaled scores first (cap * tanh(scale * s / cap)) */
static void softmax_row(float *row, int64_t lo, int64_t valid, int64_t len, float scale,
                        float cap) {
    if (cap > 0.0f) {
        for (int64_t t = lo; t < valid; t++) row[t] = cap * tanhf(row[t] * scale / cap);
        scale = 1.0f;
    }
    float best = -INFINITY;
    for (int64_t t = lo; t < valid; t++) best = row[t] > best ? row[t] : best;
    vec sum = splat(0.0f);
    int64_t t = lo;
    for (; t + W <= valid; t += W) {
        const vec e = vexp((load(row + t) - splat(best)) * splat(scale));
        store(row + t, e);
        sum += e;
    }
    float total = hsum(sum);
    for (; t < valid; t++) {
        row[t] = expf((row[t] - best) * scale);
        total += row[t];
    }
    const float inv = 1.0f / total;
    for (t = lo; t < valid; t++) row[t] *= inv;
    for (t = 0; t < lo; t++) row[t] = 0.0f;
    for (t = valid; t < len; t++) row[t] = 0.0f;
}

int prefill_attention(const float *q, int64_t q_stride, const float *k, const float *v,
                      int64_t kv_stride, float *out, int64_t out_stride, int64_t n, int64_t ctx,
                      int64_t num_q, int64_t num_kv, int64_t hd, float scale, int threads,
                      int64_t window, float softcap) {
    if (hd % NR || n < 1 || ctx < n || num_q % num_kv) return -1;
    const int64_t offset = ctx - n, panels = (ctx + NR - 1) / NR, group = num_q / num_kv;
    const int64_t blocks = (n + QB - 1) / QB, width = panels * NR;
    float *packed = malloc((size_t)(num_kv * panels * hd * NR) * sizeof(float));
    if (!packed) return -2;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t h = 0; h < num_kv; h++)
            for (int64_t p = 0; p < panels; p++)
                pack_keys(k + h * hd, kv_stride, ctx, hd, packed + h * panels * hd * NR, p);
        float *scores = malloc((size_t)(QB * width) * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t b = blocks - 1; b >= 0; b--) /* the longest blocks first */
            for (int64_t h = 0; h < num_q; h++) {
                if (!scores) continue;
                const int64_t i0 = b * QB, rows = n - i0 < QB ? n - i0 : QB;
                const int64_t keys = offset + i0 + rows, used = (keys + NR - 1) / NR;
                /* a sliding window: no query of the block sees a key before `first` */
                const int64_t first = window > 0 && offset + i0 - window + 1 > 0 ? offset + i0 - window + 1 : 0;
                const int64_t p0 = first / NR, skip = p0 * NR;
                const float *kp = packed + (h / group) * panels * hd * NR;
                const float *qh = q + i0 * q_stride + h * hd;
                for (int64_t p = p0; p < used; p++) /* scores (rows, keys) */
                    rows_times_columns(qh, q_stride, kp + p * hd * NR, NR, hd, scores + p * NR,
                                       width, rows, 0);
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t pos = offset + i0 + r, lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
                    softmax_row(scores + r * width, lo, pos + 1, keys, scale, softcap);
                }
                const float *vh = v + (h / group) * hd + skip * kv_stride;
                float *oh = out + i0 * out_stride + h * hd;
                for (int64_t d = 0; d < hd; d += NR) /* probabilities x values, 16 features at a time */
                    rows_times_columns(scores + skip, width, vh + d, kv_stride, keys - skip, oh + d,
                                       out_stride, rows, 0);
            }
        free(scores);
    }
    free(packed);
    return failed ? -2 : 0;
}

#else

int prefill_attention(const float *q, int64_t q_stride, const float *k, const float *v,
                      int64_t kv_stride, float *out, int64_t out_stride, int64_t n, int64_t ctx,
                      int64_t num_q, int64_t num_kv, int64_t hd, float scale, int threads,
                      int64_t window, float softcap) {
    return -1;
}

#endif
