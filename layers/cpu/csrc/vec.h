/* Portable 8-float vectors (GCC vector extensions: AVX2 where the CPU has it, split into
 * narrower registers elsewhere) and a vectorised exp, shared by the CPU kernels. */
#ifndef SHARDLM_VEC_H
#define SHARDLM_VEC_H

#include <stdint.h>
#include <string.h>

#define W 8 /* floats per vector: AVX2 width; the compiler splits it where vectors are narrower */

typedef float vec __attribute__((vector_size(W * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t))));

typedef uint16_t hvec __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t uvec __attribute__((vector_size(W * sizeof(uint32_t))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
/* W bfloat16 values widened to float32 (a bf16 is a float32's upper half) */
static inline vec load_bf16(const uint16_t *p) {
    hvec h;
    memcpy(&h, p, sizeof h);
    const uvec u = __builtin_convertvector(h, uvec) << 16;
    vec v;
    memcpy(&v, &u, sizeof v);
    return v;
}
/* W float32 -> bfloat16 at p, each rounded to nearest even (NaN stays NaN) */
static inline void store_bf16(uint16_t *p, vec v) {
    uvec u;
    memcpy(&u, &v, sizeof u);
    const uvec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet = (u >> 16) | 0x40u;
    const uvec nan = (uvec)((u & 0x7fffffffu) > 0x7f800000u);  /* lanes: all ones where NaN */
    const hvec h = __builtin_convertvector((nan & quiet) | (~nan & rounded), hvec);
    memcpy(p, &h, sizeof h);
}

/* float32 -> bfloat16, rounded to nearest even (NaN stays NaN) */
static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec splat(float x) { return (vec){x, x, x, x, x, x, x, x}; }
static inline float hsum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r = x - n ln2 in
 * [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error ~2e-7); 0 below -87. */
static inline vec vexp(vec x) {
    ivec xi, loi, keep = x >= splat(-87.0f);  /* lanes: -1 where true, 0 where false */
    const vec lo = splat(-87.0f);
    memcpy(&xi, &x, sizeof xi);
    memcpy(&loi, &lo, sizeof loi);
    xi = (xi & keep) | (loi & ~keep);
    memcpy(&x, &xi, sizeof x);
    const vec y = x * splat(1.44269504f) + splat(0.5f);
    const vec t = __builtin_convertvector(__builtin_convertvector(y, ivec), vec);  /* trunc */
    const vec n = t + __builtin_convertvector(t > y, vec);  /* floor: minus 1 where t > y */
    const vec r = x - n * splat(0.693145752f) - n * splat(1.42860677e-6f);
    vec p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    vec scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
