/* y = x @ W.T with W stored in 16 or 8 bits: the linear layers of a CPU worker whose weights
 * are bfloat16 (model.dtype: bfloat16) or int8 with one scale per output feature
 * (model.quantization: int8).
 *
 * Decode reads every weight once per step, so at small batches the step is bound by the bytes
 * of the weights: half of float32's in bf16, a quarter in int8. The weight keeps its natural
 * layout (out, in), the layout torch's bf16 GEMM (oneDNN, AMX where present) takes for the
 * large batches where this kernel is not the fastest; the caller picks by rows.
 *
 * bf16: each weight is widened to float32 in registers (shifted into the high half) and
 * multiplied with float32 activations, so the activations keep their precision.
 * int8: each row of x is quantized to 14-bit integers (|q| <= XQ_MAX, one float scale per
 * row: a relative step of 1/8191 of the row's largest magnitude), the weights are
 * sign-extended to 16 bits, and pairs of 16-bit products are summed into int32 lanes
 * (vpdpwssd where the CPU has AVX512-VNNI, else vpmaddwd + vpaddd); the int32 sums move into
 * float every XQ_CHUNK columns (8191 x 127 x 2048 < 2^31: they never overflow) and are scaled
 * by the row's and the output feature's scales at the end.
 *
 * A block is a few output features x up to a few rows of x (BF16_OB x BF16_RB, INT8_OB x
 * INT8_RB, by the registers there are): the block's weight rows stream once along k, each
 * widened vector serving every row. Threads split the output blocks.
 *
 * One source, two widths, chosen when it is compiled for the CPU (kernels.py builds it for the
 * CPU's own ISA and, for the tests, for AVX2 alone): 16-float registers where the CPU has
 * AVX-512 (F and BW), 8-float ones where it has AVX2 and FMA; elsewhere -1 (torch runs).
 *
 * Shapes (contiguous): x (rows, in) float32; w (out, in) bf16 (as uint16) or int8;
 * scales (out,) float32 for int8, unused for bf16; y (rows, out) float32.
 * in % 16 == 0 and out % 4 == 0, else -1 (the caller keeps torch).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FMT_BF16 1
#define FMT_INT8 2

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#include <omp.h>

/* Each of a block's weight rows is only a few cache lines long, too short for the hardware
 * prefetcher to ramp up on; so the same columns of the block PREFETCH blocks ahead are
 * requested while this one is multiplied (reading past the weight's end is harmless: a
 * prefetch never faults). */
#define PREFETCH 4
#define XQ_MAX 8191
#define XQ_CHUNK 2048

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES 16 /* floats per register */
/* output features per block and rows of x per pass over it, bf16 and int8: 16 accumulators
 * of the 32 registers */
#define BF16_OB 4
#define BF16_RB 4
#define INT8_OB 4
#define INT8_RB 4
typedef __m512 fv;
typedef __m512i iv;
static inline fv fv_zero(void) { return _mm512_setzero_ps(); }
static inline fv fv_load(const float *p) { return _mm512_loadu_ps(p); }
static inline fv fv_fma(fv a, fv b, fv c) { return _mm512_fmadd_ps(a, b, c); }
static inline fv fv_add(fv a, fv b) { return _mm512_add_ps(a, b); }
static inline fv fv_abs_max(fv m, fv x) { return _mm512_max_ps(m, _mm512_abs_ps(x)); }
static inline float fv_sum(fv v) { return _mm512_reduce_add_ps(v); }
static inline float fv_max(fv v) { return _mm512_reduce_max_ps(v); }
static inline fv widen_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
/* LANES floats -> LANES int16 at q, rounded to nearest even */
static inline void store_q(int16_t *q, fv x) {
    _mm256_storeu_si256((__m256i *)q, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(x)));
}
static inline iv iv_zero(void) { return _mm512_setzero_si512(); }
static inline iv iv_load(const int16_t *p) { return _mm512_loadu_si512((const void *)p); }
static inline iv widen_int8(const int8_t *p) {  /* 2 * LANES int8 -> int16 */
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline iv widen_int8_half(const int8_t *p) {  /* LANES int8 -> int16, the rest 0 */
    return _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p)));
}
static inline iv dot_pairs(iv acc, iv x, iv w) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, x, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}
static inline fv iv_float(iv v) { return _mm512_cvtepi32_ps(v); }
#define HALF_STEPS 1 /* in % 32 == 16: a last half step of 16 columns */

#else /* AVX2 + FMA */
#define LANES 8
/* bf16: 12 accumulators, a widened weight vector and the rows of x as memory operands in 16
 * registers (each weight widened once per 6 rows: the widening costs as much as the FMAs at
 * fewer rows per pass); int8: 16 int32 accumulators (each float sum touched once per chunk) */
#define BF16_OB 2
#define BF16_RB 6
#define INT8_OB 4
#define INT8_RB 4
typedef __m256 fv;
typedef __m256i iv;
static inline fv fv_zero(void) { return _mm256_setzero_ps(); }
static inline fv fv_load(const float *p) { return _mm256_loadu_ps(p); }
static inline fv fv_fma(fv a, fv b, fv c) { return _mm256_fmadd_ps(a, b, c); }
static inline fv fv_add(fv a, fv b) { return _mm256_add_ps(a, b); }
static inline fv fv_abs_max(fv m, fv x) {
    return _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
}
static inline __m128 fold(fv v) {  /* the two halves added */
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}
static inline float fv_sum(fv v) {
    __m128 s = fold(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float fv_max(fv v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline fv widen_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline void store_q(int16_t *q, fv x) {
    const __m256i i = _mm256_cvtps_epi32(x);  /* |i| <= XQ_MAX: the saturating pack is exact */
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(i, i), 0x08);
    _mm_storeu_si128((__m128i *)q, _mm256_castsi256_si128(packed));
}
static inline iv iv_zero(void) { return _mm256_setzero_si256(); }
static inline iv iv_load(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline iv widen_int8(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline iv widen_int8_half(const int8_t *p) { return widen_int8(p); } /* never called */
static inline iv dot_pairs(iv acc, iv x, iv w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
static inline fv iv_float(iv v) { return _mm256_cvtepi32_ps(v); }
#define HALF_STEPS 0 /* a step of 16 int16 is in's granularity */
#endif

#define QSTEP (2 * LANES) /* int16 columns per dot_pairs */

/* bf16: y[r * ldy + o] = sum_k x[r * in + k] * w[o * in + k], r < nr, o < BF16_OB */
static inline __attribute__((always_inline)) void block_bf16(
        const float *x, const uint16_t *w, int64_t in, float *y, int64_t ldy, const int nr) {
    fv acc[BF16_RB][BF16_OB];
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 8") for (int o = 0; o < BF16_OB; o++) acc[r][o] = fv_zero();
    for (int64_t k = 0; k < in; k += LANES) {
        fv xv[BF16_RB];
        _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++) xv[r] = fv_load(x + r * in + k);
        _Pragma("GCC unroll 8") for (int o = 0; o < BF16_OB; o++) {
            _mm_prefetch((const char *)(w + (o + PREFETCH * BF16_OB) * in + k), _MM_HINT_T1);
            const fv wv = widen_bf16(w + o * in + k);
            _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++) acc[r][o] = fv_fma(xv[r], wv, acc[r][o]);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 8") for (int o = 0; o < BF16_OB; o++) y[r * ldy + o] = fv_sum(acc[r][o]);
}

/* Each row of x as integers: xq rows `stride` int16 apart (in rounded up to QSTEP, the tail
 * zero), xs[r] the row's step (x ~ xq * xs). Rounded to nearest even, as lrintf. */
static void quantize_rows(const float *x, int64_t rows, int64_t in, int16_t *xq, int64_t stride,
                          float *xs) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * in;
        fv peak = fv_zero();
        for (int64_t k = 0; k < in; k += LANES) peak = fv_abs_max(peak, fv_load(row + k));
        const float top = fv_max(peak), step = top > 0.0f ? top / XQ_MAX : 1.0f;
        const float inv = 1.0f / step;
        fv scale;
        for (int l = 0; l < LANES; l++) scale[l] = inv;
        int16_t *q = xq + r * stride;
        for (int64_t k = 0; k < in; k += LANES) store_q(q + k, fv_load(row + k) * scale);
        memset(q + in, 0, sizeof(int16_t) * (stride - in));
        xs[r] = step;
    }
}

/* one QSTEP of columns (half: only the first LANES of the weights, the rest of xq is 0) */
static inline __attribute__((always_inline)) void int_step(
        iv sums[INT8_RB][INT8_OB], const int16_t *xq, int64_t stride, const int8_t *w, int64_t in,
        int64_t k, const int nr, const int half) {
    iv xv[INT8_RB];
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++) xv[r] = iv_load(xq + r * stride + k);
    _Pragma("GCC unroll 8") for (int o = 0; o < INT8_OB; o++) {
        _mm_prefetch((const char *)(w + (o + 2 * PREFETCH * INT8_OB) * in + k), _MM_HINT_T1);
        const iv wv = half ? widen_int8_half(w + o * in + k) : widen_int8(w + o * in + k);
        _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++) sums[r][o] = dot_pairs(sums[r][o], xv[r], wv);
    }
}

static inline __attribute__((always_inline)) void block_int8(
        const int16_t *xq, int64_t stride, const float *xs, const int8_t *w, const float *scales,
        int64_t in, float *y, int64_t ldy, const int nr) {
    fv acc[INT8_RB][INT8_OB];
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 8") for (int o = 0; o < INT8_OB; o++) acc[r][o] = fv_zero();
    for (int64_t k0 = 0; k0 < in; k0 += XQ_CHUNK) {
        const int64_t k1 = k0 + XQ_CHUNK < in ? k0 + XQ_CHUNK : in;
        iv sums[INT8_RB][INT8_OB];
        _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
            _Pragma("GCC unroll 8") for (int o = 0; o < INT8_OB; o++) sums[r][o] = iv_zero();
        int64_t k = k0;
        for (; k + QSTEP <= k1; k += QSTEP) int_step(sums, xq, stride, w, in, k, nr, 0);
        if (HALF_STEPS && k < k1) int_step(sums, xq, stride, w, in, k, nr, 1);
        _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
            _Pragma("GCC unroll 8") for (int o = 0; o < INT8_OB; o++) acc[r][o] = fv_add(acc[r][o], iv_float(sums[r][o]));
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 8") for (int o = 0; o < INT8_OB; o++)
            y[r * ldy + o] = fv_sum(acc[r][o]) * xs[r] * scales[o];
}

/* every row of x against a block of output features: rb rows per pass, the tail by count
 * (constant counts keep the accumulators in registers) */
#define FOR_ROW_BLOCKS(rows, rb, CALL)                        \
    do {                                                      \
        int64_t r = 0;                                        \
        for (; r + (rb) <= rows; r += (rb)) CALL(r, (rb));    \
        switch (rows - r) {                                   \
        case 1: CALL(r, 1); break;                            \
        case 2: if ((rb) > 2) CALL(r, 2); break;              \
        case 3: if ((rb) > 3) CALL(r, 3); break;              \
        case 4: if ((rb) > 4) CALL(r, 4); break;              \
        case 5: if ((rb) > 5) CALL(r, 5); break;              \
        }                                                     \
    } while (0)

static void rows_bf16(const float *x, const uint16_t *w, int64_t rows, int64_t in, float *y, int64_t out) {
#define BF16_CALL(r, n) block_bf16(x + (r) * in, w, in, y + (r) * out, out, n)
    FOR_ROW_BLOCKS(rows, BF16_RB, BF16_CALL);
#undef BF16_CALL
}

static void rows_int8(const int16_t *xq, int64_t stride, const float *xs, const int8_t *w,
                      const float *scales, int64_t rows, int64_t in, float *y, int64_t out) {
#define INT8_CALL(r, n) block_int8(xq + (r) * stride, stride, xs + (r), w, scales, in, y + (r) * out, out, n)
    FOR_ROW_BLOCKS(rows, INT8_RB, INT8_CALL);
#undef INT8_CALL
}

int lowp_linear(const float *x, const void *w, const float *scales, float *y, int64_t rows,
                int64_t in, int64_t out, int format, int threads) {
    if (rows < 1 || in % 16 || out % 4 || (format != FMT_BF16 && format != FMT_INT8) ||
        (format == FMT_INT8 && !scales))
        return -1;  /* out % 4: every block size divides it */
    if (format == FMT_BF16) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < out / BF16_OB; b++)
            rows_bf16(x, (const uint16_t *)w + b * BF16_OB * in, rows, in, y + b * BF16_OB, out);
        return 0;
    }
    const int64_t stride = (in + QSTEP - 1) / QSTEP * QSTEP;
    int16_t *xq = malloc(sizeof(int16_t) * rows * stride + sizeof(float) * rows);
    if (!xq) return -2;
    float *xs = (float *)(xq + rows * stride);
    quantize_rows(x, rows, in, xq, stride, xs);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < out / INT8_OB; b++)
        rows_int8(xq, stride, xs, (const int8_t *)w + b * INT8_OB * in, scales + b * INT8_OB, rows, in,
                  y + b * INT8_OB, out);
    free(xq);
    return 0;
}

#else /* neither AVX-512 nor AVX2: decline, the layers keep torch's matmul */

int lowp_linear(const float *x, const void *w, const float *scales, float *y, int64_t rows,
                int64_t in, int64_t out, int format, int threads) { return -1; }

#endif
