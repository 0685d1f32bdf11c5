/* The CPU kernels that other kernels call (one shared library holds them all). */
#ifndef SHARDLM_KERNELS_H
#define SHARDLM_KERNELS_H

#include <stdint.h>

int packed_linear(const float *x, const float *panels, float *y, int64_t rows, int64_t in,
                  int64_t out, int threads, int exact);
int lowp_linear(const float *x, const void *w, const float *scales, float *y, int64_t rows,
                int64_t in, int64_t out, int format, int threads);
int rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t hidden,
             float eps, int threads);
int add_rms_norm(const float *a, const float *b, const float *w, float *sum, float *out,
                 int64_t rows, int64_t hidden, float eps, int threads);
int rope_inplace(float *x, int64_t stride, int64_t tokens, int64_t heads, int64_t hd,
                 const float *cos, const float *sin, int threads);
int write_kv(const float *k, const float *v, int64_t stride, void *cache, const int64_t *slots,
             int64_t tokens, int64_t width, int64_t total_slots, int bf16);
int silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int threads);
int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int threads);
int gelu_tanh_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int threads);
int gelu_tanh_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int threads);
int sigmoid_rows(const float *x, float *out, int64_t n);
int argmax_rows(const float *x, int64_t rows, int64_t n, float *best, int64_t *index, int threads);
int amx_linear_available(void);
int amx_pack_bf16(const uint16_t *w, uint16_t *out, int64_t n, int64_t k);
int amx_linear(const void *x, int x_bf16, const uint16_t *packed, void *y, int y_bf16, int64_t m,
               int64_t n, int64_t k, int threads);
int dpbf16_available(void);
int dpbf16_pack(const uint16_t *w, uint16_t *packed, int64_t n, int64_t k);
int dpbf16_linear(const float *x, const uint16_t *packed, float *y, int64_t m, int64_t n, int64_t k,
                  int threads);
int paged_decode_attention(const float *q, const void *cache, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, int64_t seqs, int64_t num_q,
                           int64_t num_kv, int64_t hd, int64_t num_blocks, int64_t block_size,
                           int64_t max_blocks, float scale, int kv_bf16, int threads,
                           int64_t window, float softcap);

#endif
