/* A decoder layer of a decode step (one new token per sequence) in two calls, where the
 * per-op dispatch from Python cost more than the arithmetic at small batches: the
 * attention half (norm, qkv, rotary, cache write, paged attention, o_proj) and the MLP half
 * (residual add + norm, gate/up, silu * up, down). Tensor parallelism all-reduces each
 * half's output between the calls (the caller's communicator).
 *
 * Weights are packed float32 panels (packed_linear.c, format 0), bf16 / int8 in their
 * natural (out, in) layout (lowp_linear.c, format 1 / 2; int8 with a float32 scale per output
 * feature: qkv_s, o_s, gate_up_s, down_s), or bf16 in AMX's tile order (amx_linear.c, format
 * 3: the batches of 8 rows and more, where the tiles beat widening in registers; every width
 * a multiple of 32), or bf16 packed for AVX512-BF16's dot products (dpbf16_linear.c, format 4:
 * every row count in deterministic mode; output widths multiples of 32), no biases; activations float32, contiguous:
 *   x, attn_out, h, mlp_out (rows, hidden); cos, sin (rows, hd / 2); slots, context_lens
 *   (rows,); block_tables (rows, max_blocks); cache (2, num_blocks, block_size, num_kv, hd), float32 or
 *   bfloat16 (kv_bf16).
 * Every shape check happens before the first write, so -1 leaves everything untouched and
 * the caller runs the layer op by op instead. -2: out of memory; -3: a cache slot out of range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define PANEL 16
#define FMT_AMX 3
#define FMT_DP 4 /* bf16 packed by dpbf16_pack, every row count (deterministic mode) */

/* Threads for the element-wise ops (norms, rotary, silu): at a few rows their work is a few
 * microseconds, less than waking and joining a second thread costs */
static int light_threads(int64_t rows, int threads) { return rows < 8 ? 1 : threads; }

static int linear(const float *x, const void *w, const float *w_scales, float *y, int64_t rows,
                  int64_t in, int64_t out, int format, int threads, int exact) {
    if (format == FMT_AMX) return amx_linear(x, 0, (const uint16_t *)w, y, 0, rows, out, in, threads);
    if (format == FMT_DP) return dpbf16_linear(x, (const uint16_t *)w, y, rows, out, in, threads);
    if (format) return lowp_linear(x, w, w_scales, y, rows, in, out, format, threads);
    return packed_linear(x, (const float *)w, y, rows, in, out, threads, exact);
}

int decode_attention_half(
        const float *x, int64_t rows, int64_t hidden, const float *norm_w, float eps,
        const void *qkv_w, const float *qkv_s, int64_t num_q, int64_t num_kv, int64_t hd, const float *cos,
        const float *sin, void *cache, const int64_t *slots, int64_t num_blocks,
        int64_t block_size, const int64_t *block_tables, int64_t max_blocks,
        const int64_t *context_lens, float scale, const void *o_w, const float *o_s, float *attn_out,
        int format, int kv_bf16, int threads, int exact) {
    const int64_t width = (num_q + 2 * num_kv) * hd, q_width = num_q * hd;
    if (rows < 1 || hidden % PANEL || hd % 16 || width % PANEL || num_kv < 1 || num_q % num_kv ||
        num_q / num_kv > 16 || hd > 256 || num_kv > 64 ||
        (format == FMT_AMX && (hidden % 32 || width % 32 || q_width % 32 || !amx_linear_available())) ||
        (format == FMT_DP && (hidden % 32 || width % 32 || !dpbf16_available())))
        return -1;
    float *normed = malloc(sizeof(float) * rows * (hidden + width + 2 * q_width));
    if (!normed) return -2;
    float *qkv = normed + rows * hidden, *q = qkv + rows * width, *attn = q + rows * q_width;
    const int light = light_threads(rows, threads);
    int rc = rms_norm(x, norm_w, normed, rows, hidden, eps, light);
    if (!rc) rc = linear(normed, qkv_w, qkv_s, qkv, rows, hidden, width, format, threads, exact);
    if (!rc) rc = rope_inplace(qkv, width, rows, num_q + num_kv, hd, cos, sin, light);
    if (!rc) rc = write_kv(qkv + q_width, qkv + q_width + num_kv * hd, width, cache, slots, rows,
                           num_kv * hd, num_blocks * block_size, kv_bf16);
    if (!rc) {
        for (int64_t r = 0; r < rows; r++) memcpy(q + r * q_width, qkv + r * width, sizeof(float) * q_width);
        rc = paged_decode_attention(q, cache, block_tables, context_lens, attn, rows, num_q, num_kv,
                                    hd, num_blocks, block_size, max_blocks, scale, kv_bf16, threads,
                                    0, 0.0f);
    }
    if (!rc) rc = linear(attn, o_w, o_s, attn_out, rows, q_width, hidden, format, threads, exact);
    free(normed);
    return rc;
}

/* add_h: mlp_out = h + down(...), the whole layer's output (no all-reduce between: one rank) */
int decode_mlp_half(const float *attn, const float *x, int64_t rows, int64_t hidden,
                    const float *norm_w, float eps, const void *gate_up_w, const float *gate_up_s,
                    int64_t inter, const void *down_w, const float *down_s, float *h,
                    float *mlp_out, int add_h, int format, int threads, int exact) {
    if (rows < 1 || hidden % PANEL || (2 * inter) % PANEL || inter % (format ? 16 : 8) ||
        (format == FMT_AMX && (hidden % 32 || inter % 32 || !amx_linear_available())) ||
        (format == FMT_DP && (hidden % 32 || inter % 16 || !dpbf16_available())))
        return -1;
    float *normed = malloc(sizeof(float) * rows * (hidden + 3 * inter));
    if (!normed) return -2;
    float *gate_up = normed + rows * hidden, *act = gate_up + rows * 2 * inter;
    const int light = light_threads(rows, threads);
    int rc = add_rms_norm(attn, x, norm_w, h, normed, rows, hidden, eps, light);
    if (format == FMT_AMX) {  /* as the op-by-op path: gate/up rounded to bf16, silu * up in bf16 */
        uint16_t *gate_up16 = (uint16_t *)gate_up, *act16 = gate_up16 + rows * 2 * inter;
        if (!rc) rc = amx_linear(normed, 0, gate_up_w, gate_up16, 1, rows, 2 * inter, hidden, threads);
        if (!rc) rc = silu_mul_bf16(gate_up16, act16, rows, inter, light);
        if (!rc) rc = amx_linear(act16, 1, down_w, mlp_out, 0, rows, hidden, inter, threads);
    } else {
        if (!rc) rc = linear(normed, gate_up_w, gate_up_s, gate_up, rows, hidden, 2 * inter, format, threads, exact);
        if (!rc) rc = silu_mul(gate_up, act, rows, inter, light);
        if (!rc) rc = linear(act, down_w, down_s, mlp_out, rows, inter, hidden, format, threads, exact);
    }
    if (!rc && add_h)
        for (int64_t i = 0; i < rows * hidden; i++) mlp_out[i] += h[i];
    free(normed);
    return rc;
}
