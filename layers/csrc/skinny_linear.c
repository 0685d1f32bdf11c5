/* y = x @ W.T for a few rows of x: the weight-streaming case of small-batch decode.
 *
 * Shapes (float32, contiguous): x (rows, in), W (out, in), y (rows, out).
 * Each thread takes a contiguous range of W's rows and streams it once, in memory order,
 * computing every row of x against each weight row (x stays in L1); independent
 * accumulators (one per row of x, or four per weight row for a single row) hide FMA
 * latency. On the machine this was written on this streamed at about twice the bandwidth
 * of MKL's GEMV. `in` must be a multiple of 8; otherwise the function returns -1
 * and the caller uses torch.
 */
#include <stdint.h>
#include <string.h>

#define W 8
#define MAX_ROWS 8

typedef float vec __attribute__((vector_size(W * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}

/* y[r][o] for every row r of x from weight row o, read once, sequentially */
static inline __attribute__((always_inline)) void rows_times_row(
        const float *x, const float *w, float *y, int64_t rows, int64_t in, int64_t out, int64_t o) {
    const float *wo = w + o * in;
    vec acc[MAX_ROWS];
    for (int64_t r = 0; r < rows; r++) acc[r] = (vec){0};
    for (int64_t d = 0; d < in; d += W) {
        const vec wv = load(wo + d);
        for (int64_t r = 0; r < rows; r++) acc[r] += wv * load(x + r * in + d);
    }
    for (int64_t r = 0; r < rows; r++) y[r * out + o] = hsum(acc[r]);
}

static void rows_times_weight(const float *x, const float *w, float *y, int64_t rows,
                              int64_t in, int64_t out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) rows_times_row(x, w, y, rows, in, out, o);
}

/* rows == 1: weight rows one after another, a purely sequential stream; four accumulators
 * over the row's chunks keep FMA chains independent */
static inline __attribute__((always_inline)) void gemv_row(
        const float *x, const float *w, float *y, int64_t in, int64_t o) {
    const float *wo = w + o * in;
    vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t d = 0;
    for (; d + 4 * W <= in; d += 4 * W) {
        a0 += load(wo + d) * load(x + d);
        a1 += load(wo + d + W) * load(x + d + W);
        a2 += load(wo + d + 2 * W) * load(x + d + 2 * W);
        a3 += load(wo + d + 3 * W) * load(x + d + 3 * W);
    }
    for (; d < in; d += W) a0 += load(wo + d) * load(x + d);
    y[o] = hsum((a0 + a1) + (a2 + a3));
}

int skinny_linear(const float *x, const float *w, float *y, int64_t rows, int64_t in,
                  int64_t out, int threads) {
    if (rows < 1 || rows > MAX_ROWS || in % W) return -1;
    if (rows == 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t o = 0; o < out; o++) gemv_row(x, w, y, in, o);
        return 0;
    }
    switch (rows) {  /* constant row counts keep the accumulators in registers */
    case 2: rows_times_weight(x, w, y, 2, in, out, threads); break;
    case 4: rows_times_weight(x, w, y, 4, in, out, threads); break;
    case 8: rows_times_weight(x, w, y, 8, in, out, threads); break;
    default: rows_times_weight(x, w, y, rows, in, out, threads);
    }
    return 0;
}
