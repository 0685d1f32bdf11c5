/* The register-blocked AVX2 micro-kernel shared by the matmul-shaped CPU kernels.
 *
 * y[r][c] = sum_k x[r * ldx + k] * b[k * ldb + c] for r < rows (1..6), c < 16: one row of x
 * broadcast against 16 consecutive floats of b per k, 6 x 16 results held in 12 AVX
 * registers for the whole walk over k. b's 16 columns are contiguous for each k; its rows
 * may be any stride apart (16 in a packed weight panel, a tensor's row stride elsewhere).
 * Include only where __AVX2__ and __FMA__ are defined.
 */
#ifndef SHARDLM_MICROKERNEL_H
#define SHARDLM_MICROKERNEL_H

#include <immintrin.h>
#include <stdint.h>

#define NR 16 /* columns per call: two 8-float vectors */
#define MR 6  /* rows per call: 12 accumulators + 2 vectors of b + 1 broadcast */

static inline __attribute__((always_inline)) void micro(
        const float *x, int64_t ldx, const float *b, int64_t ldb, int64_t depth, float *y,
        int64_t ldy, int rows) {
    __m256 lo[MR], hi[MR];
    _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
        lo[r] = _mm256_setzero_ps();
        hi[r] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < depth; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
        _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
            const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
            lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(y + r * ldy, lo[r]);
        _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
    }
}

/* One row of x (a GEMV, batch-1 decode): four independent pairs of accumulators over
 * consecutive k, so that the loop is bound by loads rather than by the latency of one FMA
 * chain and the core keeps more of the weight stream in flight (1.2x on a 4 KiB-page stream). */
static inline void micro1(const float *x, const float *b, int64_t ldb, int64_t depth, float *y) {
    __m256 lo[4], hi[4];
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
        lo[u] = _mm256_setzero_ps();
        hi[u] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 4 <= depth; k += 4) {
        _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
            const float *bk = b + (k + u) * ldb;
            const __m256 a = _mm256_broadcast_ss(x + k + u);
            lo[u] = _mm256_fmadd_ps(a, _mm256_loadu_ps(bk), lo[u]);
            hi[u] = _mm256_fmadd_ps(a, _mm256_loadu_ps(bk + 8), hi[u]);
        }
    }
    for (; k < depth; k++) {
        const __m256 a = _mm256_broadcast_ss(x + k);
        lo[0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(b + k * ldb), lo[0]);
        hi[0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(b + k * ldb + 8), hi[0]);
    }
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3])));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3])));
}

/* Any number of rows of x against the same 16 columns of b, MR rows per micro call. A
 * single row goes to micro1, whose four accumulator chains sum in another order than
 * micro's one; with `exact` it goes to micro too, so that a row's result is the same
 * whatever the number of rows beside it (deterministic mode). */
static inline void rows_times_columns(const float *x, int64_t ldx, const float *b, int64_t ldb,
                                      int64_t depth, float *y, int64_t ldy, int64_t rows,
                                      int exact) {
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) micro(x + r * ldx, ldx, b, ldb, depth, y + r * ldy, ldy, MR);
    const float *xr = x + r * ldx;
    float *yr = y + r * ldy;
    switch (rows - r) { /* constant row counts keep the accumulators in registers */
    case 1:
        if (exact) micro(xr, ldx, b, ldb, depth, yr, ldy, 1);
        else micro1(xr, b, ldb, depth, yr);
        break;
    case 2: micro(xr, ldx, b, ldb, depth, yr, ldy, 2); break;
    case 3: micro(xr, ldx, b, ldb, depth, yr, ldy, 3); break;
    case 4: micro(xr, ldx, b, ldb, depth, yr, ldy, 4); break;
    case 5: micro(xr, ldx, b, ldb, depth, yr, ldy, 5); break;
    }
}

#endif
