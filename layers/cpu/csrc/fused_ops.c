/* The small per-layer operations of a decoder layer, one call each instead of a handful of
 * torch ops: at small batches the dispatch of those ops cost more than their arithmetic.
 *
 *   rms_norm      out = x / rms(x) * w                       x (rows, hidden)
 *   add_rms_norm  sum = a + b; out = sum / rms(sum) * w     a, b (rows, hidden)
 *   rope_inplace  rotary on the q and k heads of the fused qkv rows, in place
 *   write_kv      each token's keys and values into the paged cache at its slot
 *   silu_mul      out = silu(gate) * up                      gate_up (rows, 2 * inter)
 *   gelu_tanh_mul out = gelu_tanh(gate) * up                 gate_up (rows, 2 * inter)
 *   sigmoid_rows  out = sigmoid(x)                           x (n,)
 *
 * float32, contiguous rows; rope, write_kv and the gated activations also on bf16 (computed
 * in float32, rounded once). The norms, rope and write_kv take widths that are multiples of
 * 8 (head_dim of 16), otherwise they return -1 and the layers use torch; the activations
 * take any width, each element computed alike wherever it sits. Threads split rows once a call has enough
 * work to pay for waking them.
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define PARALLEL_MIN 32768 /* elements per call below which one thread does it all */

static inline float inv_rms(const float *x, int64_t n, float eps) {
    vec a = splat(0.0f), b = splat(0.0f);
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        const vec u = load(x + i), v = load(x + i + W);
        a += u * u;
        b += v * v;
    }
    for (; i < n; i += W) {
        const vec u = load(x + i);
        a += u * u;
    }
    return 1.0f / sqrtf(hsum(a + b) / (float)n + eps);
}

static inline void scale_row(const float *x, const float *w, float *out, int64_t n, float r) {
    const vec rv = splat(r);
    for (int64_t i = 0; i < n; i += W) store(out + i, load(x + i) * rv * load(w + i));
}

int rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t hidden,
             float eps, int threads) {
    if (hidden % W) return -1;
#pragma omp parallel for num_threads(threads) if (rows * hidden >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * hidden;
        scale_row(xr, w, out + r * hidden, hidden, inv_rms(xr, hidden, eps));
    }
    return 0;
}

int add_rms_norm(const float *a, const float *b, const float *w, float *sum, float *out,
                 int64_t rows, int64_t hidden, float eps, int threads) {
    if (hidden % W) return -1;
#pragma omp parallel for num_threads(threads) if (rows * hidden >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *ar = a + r * hidden, *br = b + r * hidden;
        float *sr = sum + r * hidden;
        for (int64_t i = 0; i < hidden; i += W) store(sr + i, load(ar + i) + load(br + i));
        scale_row(sr, w, out + r * hidden, hidden, inv_rms(sr, hidden, eps));
    }
    return 0;
}

/* x (head_dim) rotated by the angles of its token: halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) */
static inline void rotate_head(float *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i += W) {
        const vec x1 = load(x + i), x2 = load(x + half + i), c = load(cos + i), s = load(sin + i);
        store(x + i, x1 * c - x2 * s);
        store(x + half + i, x2 * c + x1 * s);
    }
}

/* x: tokens rows, `stride` floats apart, each starting with `heads` heads of hd floats
 * (q and k heads side by side in the fused qkv output); cos, sin (tokens, hd / 2). */
int rope_inplace(float *x, int64_t stride, int64_t tokens, int64_t heads, int64_t hd,
                 const float *cos, const float *sin, int threads) {
    if (hd % (2 * W)) return -1;
    const int64_t half = hd / 2;
#pragma omp parallel for num_threads(threads) if (tokens * heads * hd >= PARALLEL_MIN) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) rotate_head(x + t * stride + h * hd, cos + t * half, sin + t * half, half);
    return 0;
}

/* rotate_head on bf16 heads: computed in float32 and rounded once */
static inline void rotate_head_bf16(uint16_t *x, const float *cos, const float *sin, int64_t half) {
    for (int64_t i = 0; i < half; i += W) {
        const vec x1 = load_bf16(x + i), x2 = load_bf16(x + half + i), c = load(cos + i), s = load(sin + i);
        store_bf16(x + i, x1 * c - x2 * s);
        store_bf16(x + half + i, x2 * c + x1 * s);
    }
}

/* rope_inplace on bf16 rows (`stride` bf16 values apart) */
int rope_inplace_bf16(uint16_t *x, int64_t stride, int64_t tokens, int64_t heads, int64_t hd,
                      const float *cos, const float *sin, int threads) {
    if (hd % (2 * W)) return -1;
    const int64_t half = hd / 2;
#pragma omp parallel for num_threads(threads) if (tokens * heads * hd >= PARALLEL_MIN) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) rotate_head_bf16(x + t * stride + h * hd, cos + t * half, sin + t * half, half);
    return 0;
}

static int slots_in_range(const int64_t *slots, int64_t tokens, int64_t total_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= total_slots) return 0;
    return 1;
}

/* k, v: tokens rows `stride` floats apart, each row `width` = num_kv * hd floats; cache
 * (2, total_slots, width): token t's keys go to cache[0][slots[t]], values to cache[1][slots[t]] */
int write_kv(const float *k, const float *v, int64_t stride, void *cache, const int64_t *slots,
             int64_t tokens, int64_t width, int64_t total_slots, int bf16) {
    if (!slots_in_range(slots, tokens, total_slots)) return -3;  /* nothing written */
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t at_k = slots[t] * width, at_v = (total_slots + slots[t]) * width;
        if (bf16) {  /* a bf16 cache: each value rounded to nearest even */
            uint16_t *c = cache;
            int64_t i = 0;
            for (; i + W <= width; i += W) {
                store_bf16(c + at_k + i, load(k + t * stride + i));
                store_bf16(c + at_v + i, load(v + t * stride + i));
            }
            for (; i < width; i++) {
                c[at_k + i] = to_bf16(k[t * stride + i]);
                c[at_v + i] = to_bf16(v[t * stride + i]);
            }
        } else {
            memcpy((float *)cache + at_k, k + t * stride, width * sizeof(float));
            memcpy((float *)cache + at_v, v + t * stride, width * sizeof(float));
        }
    }
    return 0;
}

/* write_kv of bf16 keys and values (rows `stride` bf16 values apart) into a bf16 cache */
int write_kv_bf16(const uint16_t *k, const uint16_t *v, int64_t stride, uint16_t *cache,
                  const int64_t *slots, int64_t tokens, int64_t width, int64_t total_slots) {
    if (!slots_in_range(slots, tokens, total_slots)) return -3;  /* nothing written */
    for (int64_t t = 0; t < tokens; t++) {
        memcpy(cache + slots[t] * width, k + t * stride, width * sizeof(uint16_t));
        memcpy(cache + (total_slots + slots[t]) * width, v + t * stride, width * sizeof(uint16_t));
    }
    return 0;
}

/* sigmoid(g) = 1 / (1 + e^-g), with e^-|g| (never overflows) */
static inline vec sigmoid(vec g) {
    const vec zero = splat(0.0f), one = splat(1.0f);
    const ivec neg = g < zero;
    vec mag = g;
    ivec bits;
    memcpy(&bits, &mag, sizeof bits);
    bits &= 0x7fffffff;
    memcpy(&mag, &bits, sizeof mag);
    const vec e = vexp(-mag);             /* e^-|g| in (0, 1] */
    const vec sig_pos = one / (one + e);  /* sigmoid(|g|) */
    vec sig;
    ivec sp, sn;
    const vec sig_neg = e * sig_pos;      /* sigmoid(-|g|) */
    memcpy(&sp, &sig_pos, sizeof sp);
    memcpy(&sn, &sig_neg, sizeof sn);
    sp = (sn & neg) | (sp & ~neg);
    memcpy(&sig, &sp, sizeof sig);
    return sig;
}

/* The activations, each computed by one vector function: SILU g * sigmoid(g); GELU (tanh
 * approximation) x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), which is
 * 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); SIGMOID on its own */
enum { SILU, GELU, SIGMOID };
#define GELU_C1 1.59576912f  /* 2 sqrt(2 / pi) */
#define GELU_C3 0.0713548163f  /* 2 sqrt(2 / pi) 0.044715 */

static inline vec activate(vec g, int kind) {
    if (kind == SIGMOID) return sigmoid(g);
    if (kind == GELU) return g * sigmoid(g * (splat(GELU_C1) + splat(GELU_C3) * g * g));
    return g * sigmoid(g);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16 /* floats per AVX-512 register: the activations at twice vec.h's width */

/* vexp (vec.h) on 16 lanes, the same steps: clamp at -87 (NaN too), n = round(x / ln2),
 * r = x - n ln2 in two parts, the degree-6 polynomial, times 2^n */
static inline __m512 vexp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  /* a NaN lane takes -87, as in vexp */
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145752f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(1.42860677e-6f)));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  /* p * 2^n */
}

/* sigmoid (above) on 16 lanes */
static inline __m512 sigmoid16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 e = vexp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __m512 sig_pos = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_mul_ps(sig_pos, neg, e, sig_pos);
}

static inline __m512 activate16(__m512 g, int kind) {
    if (kind == SIGMOID) return sigmoid16(g);
    if (kind == GELU) {
        const __m512 t = _mm512_mul_ps(g, _mm512_add_ps(_mm512_set1_ps(GELU_C1),
                                       _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(GELU_C3), g), g)));
        return _mm512_mul_ps(g, sigmoid16(t));
    }
    return _mm512_mul_ps(g, sigmoid16(g));
}

static inline void gated_vec(const float *g, const float *u, float *o, int kind) {
    const __m512 a = activate16(_mm512_loadu_ps(g), kind);
    _mm512_storeu_ps(o, u ? _mm512_mul_ps(a, _mm512_loadu_ps(u)) : a);
}

static inline __m512 load16_bf16(const uint16_t *p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* store_bf16 (vec.h) on 16 lanes: nearest even, a NaN kept quiet */
static inline void store16_bf16(uint16_t *p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    h = _mm512_mask_or_epi32(h, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(h));
}

static inline void gated_vec_bf16(const uint16_t *g, const uint16_t *u, uint16_t *o, int kind) {
    store16_bf16(o, _mm512_mul_ps(activate16(load16_bf16(g), kind), load16_bf16(u)));
}
#else
#define LANES W

static inline void gated_vec(const float *g, const float *u, float *o, int kind) {
    const vec a = activate(load(g), kind);
    store(o, u ? a * load(u) : a);
}

static inline void gated_vec_bf16(const uint16_t *g, const uint16_t *u, uint16_t *o, int kind) {
    store_bf16(o, activate(load_bf16(g), kind) * load_bf16(u));
}
#endif

/* o = act(g) * u over a row of n (u NULL: o = act(g)): every element through the same
 * vector code, the last partial vector through a zero-padded copy, so that an element's
 * result depends on its value alone, never on where it sits in the row or how wide the
 * row is (a tensor-parallel slice of any width gets the bits of the whole row) */
static inline void gated_row(const float *g, const float *u, float *o, int64_t n, int kind) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) gated_vec(g + i, u ? u + i : NULL, o + i, kind);
    if (i < n) {
        float gb[LANES] = {0}, ub[LANES] = {0}, ob[LANES];
        memcpy(gb, g + i, (size_t)(n - i) * sizeof(float));
        if (u) memcpy(ub, u + i, (size_t)(n - i) * sizeof(float));
        gated_vec(gb, u ? ub : NULL, ob, kind);
        memcpy(o + i, ob, (size_t)(n - i) * sizeof(float));
    }
}

/* the same on bf16 rows (a bf16 GEMM's output), in float32, each result rounded once */
static inline void gated_row_bf16(const uint16_t *g, const uint16_t *u, uint16_t *o, int64_t n,
                                  int kind) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) gated_vec_bf16(g + i, u + i, o + i, kind);
    if (i < n) {
        uint16_t gb[LANES] = {0}, ub[LANES] = {0}, ob[LANES];
        memcpy(gb, g + i, (size_t)(n - i) * sizeof(uint16_t));
        memcpy(ub, u + i, (size_t)(n - i) * sizeof(uint16_t));
        gated_vec_bf16(gb, ub, ob, kind);
        memcpy(o + i, ob, (size_t)(n - i) * sizeof(uint16_t));
    }
}

static int gated_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int kind,
                     int threads) {
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        gated_row(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter, inter, kind);
    return 0;
}

static int gated_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter,
                          int kind, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        gated_row_bf16(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter,
                       inter, kind);
    return 0;
}

int silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int threads) {
    return gated_mul(gate_up, out, rows, inter, SILU, threads);
}

int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int threads) {
    return gated_mul_bf16(gate_up, out, rows, inter, SILU, threads);
}

int gelu_tanh_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int threads) {
    return gated_mul(gate_up, out, rows, inter, GELU, threads);
}

int gelu_tanh_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter,
                       int threads) {
    return gated_mul_bf16(gate_up, out, rows, inter, GELU, threads);
}

/* sigmoid of n floats (a gate per token) */
int sigmoid_rows(const float *x, float *out, int64_t n) {
    gated_row(x, NULL, out, n, SIGMOID);
    return 0;
}

/* Each row's largest value and the index of its first occurrence (NaN never wins): the greedy
 * token of a logits row. x (rows, n) float32 -> best (rows,), index (rows,). torch's max over a
 * dimension, which also returns the indices, ran 8-15x slower than this at 64 x 49152.
 * scan_max keeps each lane's largest value and where it was (its first occurrence within the
 * lane) over the row's whole vectors and returns how far it got: 16 lanes under AVX-512,
 * vec.h's 8 elsewhere. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define ARGMAX_LANES 16

static int64_t scan_max(const float *x, int64_t n, float *lanes, int32_t *where) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_set1_epi32(-1), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
        top = _mm512_mask_blend_ps(gt, top, v);
        at = _mm512_mask_blend_epi32(gt, at, lane);
        lane = _mm512_add_epi32(lane, step);
    }
    _mm512_storeu_ps(lanes, top);
    _mm512_storeu_si512(where, at);
    return i;
}
#else
#define ARGMAX_LANES W

static int64_t scan_max(const float *x, int64_t n, float *lanes, int32_t *where) {
    vec top = splat(-INFINITY);
    ivec at = {-1, -1, -1, -1, -1, -1, -1, -1}, lane = {0, 1, 2, 3, 4, 5, 6, 7}, topi, vi;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        const vec v = load(x + i);
        const ivec gt = v > top;  /* lanes: -1 where greater (never for NaN) */
        memcpy(&topi, &top, sizeof topi);
        memcpy(&vi, &v, sizeof vi);
        topi = (gt & vi) | (~gt & topi);
        memcpy(&top, &topi, sizeof top);
        at = (gt & lane) | (~gt & at);
        lane += W;
    }
    store(lanes, top);
    memcpy(where, &at, sizeof at);
    return i;
}
#endif

static void row_argmax(const float *x, int64_t n, float *best, int64_t *index) {
    float lanes[ARGMAX_LANES];
    int32_t where[ARGMAX_LANES];
    int64_t i = scan_max(x, n, lanes, where);
    float m = -INFINITY;
    int64_t k = -1;
    for (int l = 0; l < ARGMAX_LANES; l++)
        if (where[l] >= 0 && (lanes[l] > m || (lanes[l] == m && where[l] < k))) {
            m = lanes[l];
            k = where[l];
        }
    for (; i < n; i++)
        if (x[i] > m) {
            m = x[i];
            k = i;
        }
    *best = m;
    *index = k < 0 ? 0 : k;
}

/* Gumbel-max sampling of each row, the noise of layers/sampler.py's gumbel_noise made in
 * place: token = argmax_v x[r, v] / temp[r] + g(seed[r], position[r], v), where g is
 * -log(-log(u)) of u = (k + 0.5) 2^-23 and k the top 23 bits of splitmix64's finaliser
 * applied to mix(mix(seed + G) + position G) + (v + 1) G (G the golden-ratio constant), all
 * in wrapping 64-bit arithmetic: the same bits as the torch version. The logarithms are
 * Cephes' single-precision polynomial (relative error about 1e-7), which the compiler
 * vectorizes; torch's logarithm may differ in the last bit. -inf entries (filtered out) never
 * win. x (rows, n) float32, seed, position (rows,) int64, temp (rows,) float32 -> index (rows,).
 * torch's version made and read six (rows, n) int64 and float tensors: 8 ms at 16 x 49152. */
#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline float cephes_logf(float x) {  /* x > 0, normal */
    union { float f; int32_t i; } b = {.f = x};
    int32_t e = ((b.i >> 23) & 0xff) - 126;
    b.i = (b.i & 0x007fffff) | 0x3f000000;  /* mantissa in [0.5, 1) */
    float m = b.f;
    const int small = m < 0.707106781186547524f;
    e -= small;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

static void gumbel_scores(const float *x, int64_t n, uint64_t row, float temp, float *out) {
#pragma omp simd
    for (int64_t v = 0; v < n; v++) {
        const uint64_t k = mix64(row + (uint64_t)(v + 1) * GOLDEN) >> (64 - 23);
        const float u = ((float)k + 0.5f) * (1.0f / 8388608.0f);
        out[v] = x[v] / temp - cephes_logf(-cephes_logf(u));
    }
}

int gumbel_argmax_rows(const float *x, int64_t rows, int64_t n, const int64_t *seed,
                       const int64_t *position, const float *temp, int64_t *index, int threads) {
    if (rows < 1 || n < 1 || n >= ((int64_t)1 << 31)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(rows >= 2 * threads ? threads : 1)
    {
        float *scores = malloc(sizeof(float) * n), best;
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const uint64_t key = mix64(mix64((uint64_t)seed[r] + GOLDEN)
                                           + (uint64_t)position[r] * GOLDEN);
                gumbel_scores(x + r * n, n, key, temp[r], scores);
                row_argmax(scores, n, &best, index + r);
            }
            free(scores);
        }
    }
    return failed ? -1 : 0;
}

int argmax_rows(const float *x, int64_t rows, int64_t n, float *best, int64_t *index, int threads) {
    if (rows < 1 || n < 1 || n >= ((int64_t)1 << 31)) return -1;
#pragma omp parallel for num_threads(rows >= 2 * threads ? threads : 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) row_argmax(x + r * n, n, best + r, index + r);
    return 0;
}

