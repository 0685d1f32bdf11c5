/* y = x @ W.T with W pre-packed into column panels: every linear layer on a CPU.
 *
 * Layout: W (out, in) is packed once, after loading and in place, into panels (out / 16, in, 16): panel j
 * holds output features 16j..16j+15, and for each input feature k their 16 weights side by
 * side. The micro-kernel (microkernel.h) multiplies up to 6 rows of x by one panel while the
 * panel streams in memory order: batch-1 decode reads every weight once, at close to memory
 * bandwidth, and with more rows the loop is FMA-bound.
 *
 * Threads split the panels (each streams its own range of the weight once per row chunk);
 * rows go in chunks small enough to stay in L2 while a thread's panels pass by.
 *
 * exact: every row's sums in one order whatever the number of rows (deterministic mode; a
 * lone row otherwise takes micro1's four chains).
 *
 * Shapes (float32, contiguous): x (rows, in), panels (out / 16, in, 16), y (rows, out).
 * Needs AVX2 + FMA; elsewhere (and where out % 16 != 0) the weight is left unpacked and the
 * layer uses torch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <omp.h>

#include "microkernel.h"

#define CHUNK_BYTES (192 * 1024) /* rows of x per chunk: about this many bytes of x */

/* Panel j holds the same 16 x in floats in both layouts (rows 16j..16j+15), only
 * transposed, so packing works in place (w == panels): one panel's worth of scratch. */
int pack_weight(const float *w, float *panels, int64_t out, int64_t in) {
    if (out % NR) return -1;
    float *rows = malloc(sizeof(float) * NR * in);
    if (!rows) return -2;
    for (int64_t j = 0; j < out / NR; j++) {
        memcpy(rows, w + j * NR * in, sizeof(float) * NR * in);
        for (int64_t k = 0; k < in; k++)
            for (int64_t c = 0; c < NR; c++) panels[(j * in + k) * NR + c] = rows[c * in + k];
    }
    free(rows);
    return 0;
}

int packed_linear(const float *x, const float *panels, float *y, int64_t rows, int64_t in,
                  int64_t out, int threads, int exact) {
    if (out % NR || rows < 1) return -1;
    const int64_t count = out / NR;
    int64_t chunk = CHUNK_BYTES / (in * (int64_t)sizeof(float));
    chunk = chunk < MR ? MR : chunk / MR * MR;
    const int64_t chunks = (rows + chunk - 1) / chunk;
    chunk = ((rows + chunks - 1) / chunks + MR - 1) / MR * MR; /* even chunks, whole MR blocks */
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t first = count * t / n, end = count * (t + 1) / n;
        for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
            const int64_t nr = rows - r0 < chunk ? rows - r0 : chunk;
            for (int64_t j = first; j < end; j++)
                rows_times_columns(x + r0 * in, in, panels + j * in * NR, NR, in, y + r0 * out + j * NR,
                                   out, nr, exact);
        }
    }
    return 0;
}

#else /* no AVX2/FMA: decline, the layers keep torch's matmul */

int pack_weight(const float *w, float *panels, int64_t out, int64_t in) { return -1; }
int packed_linear(const float *x, const float *panels, float *y, int64_t rows, int64_t in,
                  int64_t out, int threads, int exact) { return -1; }

#endif
