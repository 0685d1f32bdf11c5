/* y = x @ W.T with W stored in 16 or 8 bits: the linear layers of a CPU worker whose weights
 * are bfloat16 (model.dtype: bfloat16) or int8 with one scale per output feature
 * (model.quantization: int8).
 *
 * Decode reads every weight once per step, so at small batches the step is bound by the bytes
 * of the weights: half of float32's in bf16, a quarter in int8. The weight keeps its natural
 * layout (out, in), the layout torch's bf16 GEMM (oneDNN, AMX where present) takes for the
 * large batches where this kernel is not the fastest; the caller picks by rows.
 *
 * Each weight is widened to float32 in registers (bf16: shift into the high half; int8:
 * sign-extend and convert) and multiplied with float32 activations, so the activations keep
 * their precision; the int8 sums are scaled per output feature at the end.
 *
 * A block is 4 output features x up to 4 rows of x: 16 accumulators of 16 floats while the
 * 4 weight rows stream once along k, each widened vector serving every row. Threads split
 * the output blocks.
 *
 * Shapes (contiguous): x (rows, in) float32; w (out, in) bf16 (as uint16) or int8;
 * scales (out,) float32 for int8, unused for bf16; y (rows, out) float32.
 * Needs AVX-512F; in % 16 == 0 and out % 4 == 0, else -1 (the caller keeps torch).
 */
#include <stdint.h>

#define FMT_BF16 1
#define FMT_INT8 2

#if defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

#define OB 4 /* output features per block */
#define RB 4 /* rows of x per pass over a block */
/* Each of a block's weight rows is only a few cache lines long, too short for the hardware
 * prefetcher to ramp up on; so the same columns of the block PREFETCH blocks ahead are
 * requested while this one is multiplied (reading past the weight's end is harmless: a
 * prefetch never faults). */
#define PREFETCH 4

static inline __m512 widen_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m512 widen_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* y[r * ldy + o] = sum_k x[r * in + k] * w[o * in + k], r < nr, o < OB (times scales[o]) */
#define DEFINE_BLOCK(NAME, WT, WIDEN)                                                            \
    static inline __attribute__((always_inline)) void NAME(                                      \
            const float *x, const WT *w, const float *scales, int64_t in, float *y, int64_t ldy,  \
            const int nr) {                                                                      \
        __m512 acc[RB][OB];                                                                      \
        _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)                                    \
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) acc[r][o] = _mm512_setzero_ps(); \
        for (int64_t k = 0; k < in; k += 16) {                                                   \
            __m512 xv[RB];                                                                       \
            _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++) xv[r] = _mm512_loadu_ps(x + r * in + k); \
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) {                              \
                _mm_prefetch((const char *)(w + (o + PREFETCH * OB) * in + k), _MM_HINT_T1);     \
                const __m512 wv = WIDEN(w + o * in + k);                                         \
                _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)                            \
                    acc[r][o] = _mm512_fmadd_ps(xv[r], wv, acc[r][o]);                           \
            }                                                                                    \
        }                                                                                        \
        _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)                                    \
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) {                              \
                const float sum = _mm512_reduce_add_ps(acc[r][o]);                               \
                y[r * ldy + o] = scales ? sum * scales[o] : sum;                                 \
            }                                                                                    \
    }

DEFINE_BLOCK(block_bf16, uint16_t, widen_bf16)
DEFINE_BLOCK(block_int8, int8_t, widen_int8)

/* every row of x against output features [o, o + OB): RB rows per pass, the tail by count */
#define DEFINE_ROWS(NAME, BLOCK, WT)                                                             \
    static void NAME(const float *x, const WT *w, const float *scales, int64_t rows, int64_t in,  \
                     float *y, int64_t out) {                                                    \
        int64_t r = 0;                                                                           \
        for (; r + RB <= rows; r += RB) BLOCK(x + r * in, w, scales, in, y + r * out, out, RB);   \
        switch (rows - r) { /* constant counts keep the accumulators in registers */             \
        case 1: BLOCK(x + r * in, w, scales, in, y + r * out, out, 1); break;                     \
        case 2: BLOCK(x + r * in, w, scales, in, y + r * out, out, 2); break;                     \
        case 3: BLOCK(x + r * in, w, scales, in, y + r * out, out, 3); break;                     \
        }                                                                                        \
    }

DEFINE_ROWS(rows_bf16, block_bf16, uint16_t)
DEFINE_ROWS(rows_int8, block_int8, int8_t)

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <math.h>
#include <stdlib.h>

/* int8 weights with VNNI: each row of x is quantized to 14-bit integers (|q| <= XQ_MAX, one
 * float scale per row: a relative step of 1/8191 of the row's largest magnitude), the
 * weights are sign-extended to 16 bits, and vpdpwssd multiplies 32 pairs per instruction
 * into int32 sums: a third of the widening path's instructions per weight. The int32 sums
 * are moved into float every XQ_CHUNK columns: 8191 x 127 x 2048 < 2^31, never overflowing. */
#define XQ_MAX 8191
#define XQ_CHUNK 2048

/* in % 16 == 0; rounded to nearest even, as lrintf */
static void quantize_rows(const float *x, int64_t rows, int64_t in, int16_t *q, float *qs) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * in;
        __m512 peak16 = _mm512_setzero_ps();
        for (int64_t k = 0; k < in; k += 16) peak16 = _mm512_max_ps(peak16, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        const float peak = _mm512_reduce_max_ps(peak16);
        const float step = peak > 0.0f ? peak / XQ_MAX : 1.0f;
        const __m512 inv = _mm512_set1_ps(1.0f / step);
        for (int64_t k = 0; k < in; k += 16)
            _mm256_storeu_si256((__m256i *)(q + r * in + k),
                                _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), inv))));
        qs[r] = step;
    }
}

static inline __attribute__((always_inline)) void block_vnni(
        const int16_t *xq, const float *xs, const int8_t *w, const float *scales, int64_t in,
        float *y, int64_t ldy, const int nr) {
    __m512 acc[RB][OB];
    _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) acc[r][o] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < in; k0 += XQ_CHUNK) {
        const int64_t k1 = k0 + XQ_CHUNK < in ? k0 + XQ_CHUNK : in;
        __m512i sums[RB][OB];
        _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) sums[r][o] = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 32) {
            __m512i xv[RB];
            _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
                xv[r] = _mm512_loadu_si512((const void *)(xq + r * in + k));
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++) {
                _mm_prefetch((const char *)(w + (o + 2 * PREFETCH * OB) * in + k), _MM_HINT_T1);
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + o * in + k)));
                _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
                    sums[r][o] = _mm512_dpwssd_epi32(sums[r][o], xv[r], wv);
            }
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
            _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++)
                acc[r][o] = _mm512_add_ps(acc[r][o], _mm512_cvtepi32_ps(sums[r][o]));
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 4") for (int o = 0; o < OB; o++)
            y[r * ldy + o] = _mm512_reduce_add_ps(acc[r][o]) * xs[r] * scales[o];
}

static void rows_vnni(const int16_t *xq, const float *xs, const int8_t *w, const float *scales,
                      int64_t rows, int64_t in, float *y, int64_t out) {
    int64_t r = 0;
    for (; r + RB <= rows; r += RB) block_vnni(xq + r * in, xs + r, w, scales, in, y + r * out, out, RB);
    switch (rows - r) {
    case 1: block_vnni(xq + r * in, xs + r, w, scales, in, y + r * out, out, 1); break;
    case 2: block_vnni(xq + r * in, xs + r, w, scales, in, y + r * out, out, 2); break;
    case 3: block_vnni(xq + r * in, xs + r, w, scales, in, y + r * out, out, 3); break;
    }
}

static int int8_vnni(const float *x, const int8_t *w, const float *scales, float *y, int64_t rows,
                     int64_t in, int64_t out, int threads) {
    int16_t *xq = malloc(sizeof(int16_t) * rows * in + sizeof(float) * rows);
    if (!xq) return -2;
    float *xs = (float *)(xq + rows * in);
    quantize_rows(x, rows, in, xq, xs);
    const int64_t blocks = out / OB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        rows_vnni(xq, xs, w + b * OB * in, scales + b * OB, rows, in, y + b * OB, out);
    free(xq);
    return 0;
}
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
static int int8_vnni(const float *x, const int8_t *w, const float *scales, float *y, int64_t rows,
                     int64_t in, int64_t out, int threads) { return -1; }
#endif

int lowp_linear(const float *x, const void *w, const float *scales, float *y, int64_t rows,
                int64_t in, int64_t out, int format, int threads) {
    if (HAVE_VNNI && format == FMT_INT8 && scales && rows >= 1 && in % 32 == 0 && out % OB == 0)
        return int8_vnni(x, (const int8_t *)w, scales, y, rows, in, out, threads);
    if (rows < 1 || in % 16 || out % OB || (format != FMT_BF16 && format != FMT_INT8) ||
        (format == FMT_INT8 && !scales))
        return -1;
    const int64_t blocks = out / OB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t o = b * OB;
        if (format == FMT_BF16)
            rows_bf16(x, (const uint16_t *)w + o * in, 0, rows, in, y + o, out);
        else
            rows_int8(x, (const int8_t *)w + o * in, scales + o, rows, in, y + o, out);
    }
    return 0;
}

#else /* no AVX-512: decline, the layers keep torch's matmul */

int lowp_linear(const float *x, const void *w, const float *scales, float *y, int64_t rows,
                int64_t in, int64_t out, int format, int threads) { return -1; }

#endif
