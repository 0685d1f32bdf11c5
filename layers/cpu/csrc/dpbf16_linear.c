/* bf16 matmuls on AVX512-BF16 dot products (vdpbf16ps), the same sums for a row whatever the
 * batch: the matmul of deterministic mode.
 *
 *   y (m, n) float32 = round_bf16(x) (m, k) @ W^T,  W (n, k) bf16 packed once by dpbf16_pack
 *
 * oneDNN's bf16 GEMM picks its blocking of k by the number of rows, so a row's sum comes out
 * in another order (other bits) in another batch; lowp_linear's sums are batch-invariant but
 * it widens every weight to float32 and runs two FMAs where vdpbf16ps runs one. Here each
 * output is one float32 lane of one accumulator, updated by one vdpbf16ps per input pair
 * (k = 0, 2, 4, ... in order) and stored as it is, with no reduction across lanes or
 * accumulators: every row's sums are made by the same instructions in the same order whatever
 * the row count, the row's position, the tiling that holds it and the number of threads
 * (threads split the output features, never k). vdpbf16ps rounds to nearest even and flushes
 * denormals whatever MXCSR holds, so no thread's floating-point settings change the sums either.
 *
 * Layout: W is packed into panels of 32 output features (n * k values, as many as W):
 * panels[p][i][c][j] = W[32 p + c][2 i + j], so for each input pair i a panel holds 32
 * features x 2 inputs in 128 contiguous bytes, the two registers that vdpbf16ps multiplies by
 * a broadcast pair of x. A tile keeps rows x (16-feature registers) accumulators over the
 * whole of k while its panels stream in memory order; many rows take one panel per tile (the
 * panel stays in L1 or L2 while the rows of x pass), a few rows take several panels at once,
 * which gives the dot products enough independent accumulators to keep up with the weight
 * stream.
 *
 * x is rounded to bf16 (nearest even) once per call into a scratch copy.
 *
 * Shapes (contiguous): x (m, k) float32; W, panels (n, k) bf16 as uint16; y (m, n) float32.
 * n % 32 == 0 (whole panels) and k % 2 == 0 (whole pairs), else -1. Without AVX512-BF16 (and F, BW) -1, and
 * dpbf16_available() 0: the caller keeps another matmul.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#define HAVE_DPBF16 1

#define PANEL 32   /* output features per panel: two registers */
#define MR 12      /* rows per tile at one panel: 24 accumulators of the 32 registers */
#define MAX_VECS 8 /* registers of features per tile: up to 4 panels at a few rows */
#define AHEAD 4096 /* bytes: how far ahead in its stream a panel is prefetched at a few rows */
#define CHUNK_BYTES (512 * 1024) /* rows of x per pass over the weight: about this many bytes of bf16 */
/* outputs of more bytes than this are written past the caches (streaming stores): they would
 * not stay in them anyway, and a plain store first reads every line it writes */
#define STREAM_BYTES (8 << 20)

/* rows [r0, r1) of x rounded to bf16 (nearest even) at a, rows k apart */
static void round_rows(const float *x, int64_t k, int64_t r0, int64_t r1, uint16_t *a) {
    for (int64_t r = r0; r < r1; r++) {
        const float *src = x + r * k;
        uint16_t *dst = a + r * k;
        int64_t i = 0;
        for (; i + 32 <= k; i += 32)
            _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                                                      _mm512_loadu_ps(src + i)));
        for (; i < k; i += 16) {  /* k % 32 columns, masked */
            const __mmask16 mask = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
            _mm256_mask_storeu_epi16(dst + i, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i)));
        }
    }
}

/* y[r * ldy + f] = sum over pairs i of x pair i of row r . W pair i of feature f, for r < rows
 * and f < 16 * vecs: x as bf16 pairs (rows ldx pairs apart), w the first of vecs / 2
 * consecutive panels of `pairs` input pairs. Whatever rows and vecs, each accumulator gets the
 * same chain of vdpbf16ps over i = 0, 1, ..., pairs - 1 (x the first product operand, the
 * weight the second). Where ahead (bytes) is not 0, each panel's stream is prefetched that
 * far ahead of its reads; where stream is, y is written with streaming stores (64-byte aligned). */
static inline __attribute__((always_inline)) void tile(
        const int32_t *x, int64_t ldx, const uint16_t *w, int64_t pairs, float *y, int64_t ldy,
        const int rows, const int vecs, int64_t ahead, int stream) {
    __m512 acc[MR][MAX_VECS];
    _Pragma("GCC unroll 12") for (int r = 0; r < rows; r++)
        _Pragma("GCC unroll 8") for (int v = 0; v < vecs; v++) acc[r][v] = _mm512_setzero_ps();
    const int64_t panel = pairs * 2 * PANEL;
    for (int64_t i = 0; i < pairs; i++) {
        __m512bh wv[MAX_VECS];
        _Pragma("GCC unroll 8") for (int v = 0; v < vecs; v++) {
            const uint16_t *at = w + (v / 2) * panel + i * 2 * PANEL + (v % 2) * PANEL;
            wv[v] = (__m512bh)_mm512_loadu_si512(at);
            if (ahead)
                _mm_prefetch((const char *)at + ahead, _MM_HINT_T0);
        }
        _Pragma("GCC unroll 12") for (int r = 0; r < rows; r++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[r * ldx + i]);
            _Pragma("GCC unroll 8") for (int v = 0; v < vecs; v++)
                acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, wv[v]);
        }
    }
    _Pragma("GCC unroll 12") for (int r = 0; r < rows; r++)
        _Pragma("GCC unroll 8") for (int v = 0; v < vecs; v++) {
            if (stream)
                _mm512_stream_ps(y + r * ldy + 16 * v, acc[r][v]);
            else
                _mm512_storeu_ps(y + r * ldy + 16 * v, acc[r][v]);
        }
}

/* rows (< MR) of x against panels [p0, p1): bound by the weight's stream, so several panels
 * per tile (enough accumulators in flight to keep up with it), each prefetched ahead
 * (constant shapes keep the accumulators in registers) */
static void few_rows(const int32_t *x, int64_t ldx, const uint16_t *packed, int64_t pairs,
                     float *y, int64_t n, int64_t p0, int64_t p1, int64_t rows, int stream) {
    const int64_t panel = pairs * 2 * PANEL;
    int64_t p = p0;
#define FEW(nr, np)                                                                               \
    for (; p + (np) <= p1; p += (np))                                                             \
        tile(x, ldx, packed + p * panel, pairs, y + p * PANEL, n, nr, 2 * (np), AHEAD, stream);   \
    for (; p < p1; p++) tile(x, ldx, packed + p * panel, pairs, y + p * PANEL, n, nr, 2, AHEAD, stream)
    switch (rows) {
    case 1: FEW(1, 4); break;
    case 2: FEW(2, 4); break;
    case 3: FEW(3, 2); break;
    case 4: FEW(4, 2); break;
    case 5: FEW(5, 2); break;
    case 6: FEW(6, 2); break;
    case 7: FEW(7, 1); break;
    case 8: FEW(8, 1); break;
    case 9: FEW(9, 1); break;
    case 10: FEW(10, 1); break;
    case 11: FEW(11, 1); break;
    }
#undef FEW
}

/* rows (>= MR) of x against panels [p0, p1): each panel passes all the rows while it stays
 * in L1 or L2, in tiles of MR rows or a little fewer (rows split evenly: no tile of a few
 * rows, too few accumulators to hide the latency of vdpbf16ps); the first tile prefetches
 * the next panel */
static void many_rows(const int32_t *x, int64_t ldx, const uint16_t *packed, int64_t pairs,
                      float *y, int64_t n, int64_t p0, int64_t p1, int64_t rows, int stream) {
    const int64_t panel = pairs * 2 * PANEL, tiles = (rows + MR - 1) / MR;
    for (int64_t p = p0; p < p1; p++)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t r = rows * t / tiles, height = rows * (t + 1) / tiles - r;
            const int64_t ahead = t == 0 ? panel * (int64_t)sizeof(uint16_t) : 0;
            const int32_t *xt = x + r * ldx;
            float *yt = y + r * n + p * PANEL;
            const uint16_t *wt = packed + p * panel;
            switch (height) {  /* MR / 2 .. MR */
            case 6: tile(xt, ldx, wt, pairs, yt, n, 6, 2, ahead, stream); break;
            case 7: tile(xt, ldx, wt, pairs, yt, n, 7, 2, ahead, stream); break;
            case 8: tile(xt, ldx, wt, pairs, yt, n, 8, 2, ahead, stream); break;
            case 9: tile(xt, ldx, wt, pairs, yt, n, 9, 2, ahead, stream); break;
            case 10: tile(xt, ldx, wt, pairs, yt, n, 10, 2, ahead, stream); break;
            case 11: tile(xt, ldx, wt, pairs, yt, n, 11, 2, ahead, stream); break;
            case 12: tile(xt, ldx, wt, pairs, yt, n, 12, 2, ahead, stream); break;
            }
        }
}
#else
#define HAVE_DPBF16 0
#endif

int dpbf16_available(void) { return HAVE_DPBF16; }

/* W (n, k) bf16 row-major -> panels (n * k values at packed, not aliasing w); 0, or -1 (shape) */
int dpbf16_pack(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k) {
#if HAVE_DPBF16
    if (n <= 0 || k <= 0 || n % 32 || k % 2)
        return -1;
    for (int64_t p = 0; p < n / 32; p++)
        for (int64_t i = 0; i < k / 2; i++) {
            uint16_t *dst = packed + (p * (k / 2) + i) * 64;
            for (int64_t c = 0; c < 32; c++) {
                dst[2 * c] = w[(32 * p + c) * k + 2 * i];
                dst[2 * c + 1] = w[(32 * p + c) * k + 2 * i + 1];
            }
        }
    return 0;
#else
    (void)w; (void)packed; (void)n; (void)k;
    return -1;
#endif
}

/* y = round_bf16(x) @ W^T with W packed by dpbf16_pack. Returns 0; -1 (no AVX512-BF16, or the
 * shape); -2 (memory). */
int dpbf16_linear(const float *x, const uint16_t *packed, float *y, int64_t m, int64_t n, int64_t k,
                  int threads) {
#if HAVE_DPBF16
    if (m <= 0 || n <= 0 || k <= 0 || n % 32 || k % 2)
        return -1;
    uint16_t *a = aligned_alloc(64, (size_t)((m * k * sizeof(uint16_t) + 63) / 64 * 64));
    if (!a)
        return -2;
    const int64_t count = n / PANEL, pairs = k / 2;
    int64_t chunk = CHUNK_BYTES / (k * (int64_t)sizeof(uint16_t));
    chunk = chunk < MR ? MR : chunk / MR * MR;
    const int64_t chunks = (m + chunk - 1) / chunk;
    chunk = ((m + chunks - 1) / chunks + MR - 1) / MR * MR; /* even chunks of whole tiles */
    const int stream = m * n * (int64_t)sizeof(float) > STREAM_BYTES && (uintptr_t)y % 64 == 0;
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        round_rows(x, k, m * t / nt, m * (t + 1) / nt, a);
#pragma omp barrier
        const int64_t p0 = count * t / nt, p1 = count * (t + 1) / nt;
        for (int64_t r0 = 0; r0 < m; r0 += chunk) {
            const int64_t rows = m - r0 < chunk ? m - r0 : chunk;
            const int32_t *xr = (const int32_t *)(a + r0 * k);
            if (rows < MR)
                few_rows(xr, pairs, packed, pairs, y + r0 * n, n, p0, p1, rows, stream);
            else
                many_rows(xr, pairs, packed, pairs, y + r0 * n, n, p0, p1, rows, stream);
        }
        if (stream)
            _mm_sfence();  /* the streaming stores seen by every thread after the region */
    }
    free(a);
    return 0;
#else
    (void)x; (void)packed; (void)y; (void)m; (void)n; (void)k; (void)threads;
    return -1;
#endif
}
