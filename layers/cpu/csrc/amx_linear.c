/* bf16 matmuls on AMX tiles, for the row counts of decode batches.
 *
 *   y (m, n) = x (m, k) @ W^T,  W (n, k) bf16 packed once by amx_pack_bf16
 *   x: float32 (rounded to bf16 here) or bf16; y: float32 or bf16 (float32 sums rounded once)
 *
 * The packed weight is W in AMX's B-tile order: for each 16 output features and each 32 of
 * the inputs, one 1 KiB tile of 16 rows (input pairs) x 16 features x 2 (a pair), so a tile
 * load reads 1 KiB in a row. Each thread takes pairs of 16-feature column blocks; for every
 * 32 rows of x it keeps four float32 accumulator tiles (2 x 2 blocks of 16 x 16) over the
 * whole depth, loading two x tiles and two weight tiles per 32 inputs. The weight streams
 * from memory once per 256 rows of x (ROWS_PER_PASS, whose bf16 copy stays in L2; within a
 * pass each column pair's weight tiles are re-read from L1/L2 for every 32 rows).
 *
 * Linux gives a process AMX's tile state only on request (arch_prctl); without AMX, without
 * that permission or for shapes outside n % 32 == 0 and k % 32 == 0, the functions return -1
 * and the caller uses another matmul.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX 1
/* rows of x per pass over the weight: their bf16 copy stays in L2 while the weight streams */
#define ROWS_PER_PASS 256
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) TileConfig;

/* tiles 0-3: accumulators (x block r, weight block c) at 2r + c; 4, 5: x; 6, 7: weight */
static void configure_tiles(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static int amx_permitted(void) {
    static int state;  /* 0: not asked yet, 1: granted, -1: refused */
    if (state == 0)
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* rows [r0, r1) of x as bf16 rows of k at a (rows past m: zeros) */
static void rows_bf16(const void *x, int x_bf16, int64_t m, int64_t k, int64_t r0, int64_t r1, uint16_t *a) {
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *dst = a + r * k;
        if (r >= m) {
            memset(dst, 0, sizeof(uint16_t) * k);
        } else if (x_bf16) {
            memcpy(dst, (const uint16_t *)x + r * k, sizeof(uint16_t) * k);
        } else {
            const float *src = (const float *)x + r * k;
            for (int64_t i = 0; i < k; i += 32)
                _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                                                          _mm512_loadu_ps(src + i)));
        }
    }
}

/* 32 x 32 float32 block (row stride 32) into y's rows [row, row + rows) and columns [col, col + 32) */
static void write_block(const float *c, int64_t rows, void *y, int y_bf16, int64_t n, int64_t row, int64_t col) {
    for (int64_t r = 0; r < rows; r++) {
        const __m512 lo = _mm512_load_ps(c + r * 32), hi = _mm512_load_ps(c + r * 32 + 16);
        if (y_bf16)
            _mm512_storeu_si512((uint16_t *)y + (row + r) * n + col, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        else {
            _mm512_storeu_ps((float *)y + (row + r) * n + col, lo);
            _mm512_storeu_ps((float *)y + (row + r) * n + col + 16, hi);
        }
    }
}

/* columns [32 p, 32 p + 32) of y for rows [row0, row1), from a (bf16 rows, zeros past m) */
static void column_pair(const uint16_t *a, int64_t row0, int64_t row1, int64_t m,
                        const uint16_t *packed, int64_t p, int64_t k, void *y, int y_bf16,
                        int64_t n, float *c) {
    const int64_t kb_count = k / 32;
    const uint16_t *b0 = packed + (2 * p) * kb_count * 512, *b1 = b0 + kb_count * 512;
    for (int64_t r0 = row0; r0 < row1; r0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t *a0 = a + r0 * k, *a1 = a0 + 16 * k;
        for (int64_t kb = 0; kb < kb_count; kb++) {
            _tile_loadd(4, a0 + kb * 32, k * 2);
            _tile_loadd(5, a1 + kb * 32, k * 2);
            _tile_loadd(6, b0 + kb * 512, 64);
            _tile_loadd(7, b1 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, 128);
        _tile_stored(1, c + 16, 128);
        _tile_stored(2, c + 16 * 32, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
        const int64_t rows = m - r0 < 32 ? m - r0 : 32;
        write_block(c, rows, y, y_bf16, n, r0, 32 * p);
    }
}
#else
#define HAVE_AMX 0
#endif

int amx_linear_available(void) {
#if HAVE_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

/* W (n, k) bf16 row-major -> AMX B-tile order (n * k values at out); 0, or -1 (shape) */
int amx_pack_bf16(const uint16_t *w, uint16_t *out, int64_t n, int64_t k) {
    if (n <= 0 || k <= 0 || n % 32 || k % 32)
        return -1;
    const int64_t kb_count = k / 32;
    for (int64_t nb = 0; nb < n / 16; nb++)
        for (int64_t kb = 0; kb < kb_count; kb++) {
            uint16_t *tile = out + (nb * kb_count + kb) * 512;
            for (int64_t pair = 0; pair < 16; pair++)
                for (int64_t col = 0; col < 16; col++) {
                    const uint16_t *src = w + (nb * 16 + col) * k + kb * 32 + 2 * pair;
                    tile[pair * 32 + col * 2] = src[0];
                    tile[pair * 32 + col * 2 + 1] = src[1];
                }
        }
    return 0;
}

/* y = x @ W^T with W packed by amx_pack_bf16. Returns 0; -1 (no AMX, or the shape); -2 (memory). */
int amx_linear(const void *x, int x_bf16, const uint16_t *packed, void *y, int y_bf16, int64_t m,
               int64_t n, int64_t k, int threads) {
#if HAVE_AMX
    if (m <= 0 || n % 32 || k % 32 || !amx_permitted())
        return -1;
    const int64_t mp = (m + 31) / 32 * 32;
    uint16_t *a = aligned_alloc(64, (size_t)(mp * k * sizeof(uint16_t)));
    if (!a)
        return -2;
#pragma omp parallel num_threads(threads)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (mp + nt - 1) / nt, r0 = t * per < mp ? t * per : mp;
        rows_bf16(x, x_bf16, m, k, r0, r0 + per < mp ? r0 + per : mp, a);
#pragma omp barrier
        float c[32 * 32] __attribute__((aligned(64)));
        configure_tiles();
        for (int64_t row0 = 0; row0 < mp; row0 += ROWS_PER_PASS) {
            const int64_t row1 = row0 + ROWS_PER_PASS < mp ? row0 + ROWS_PER_PASS : mp;
#pragma omp for schedule(dynamic, 1)
            for (int64_t p = 0; p < n / 32; p++)
                column_pair(a, row0, row1, m, packed, p, k, y, y_bf16, n, c);
        }
        _tile_release();
    }
    free(a);
    return 0;
#else
    (void)x; (void)x_bf16; (void)packed; (void)y; (void)y_bf16; (void)m; (void)n; (void)k; (void)threads;
    return -1;
#endif
}
