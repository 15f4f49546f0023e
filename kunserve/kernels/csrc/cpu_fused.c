/* The decoder layer's elementwise steps on CPU, each one pass over its rows: (add +) RMSNorm,
 * rotary on q and k in place, SiLU-mul. In torch each is a chain of small ops (RMSNorm alone is
 * seven), and at a decode step's few rows their dispatch costs more than their arithmetic.
 *
 * They round as the torch versions in kunserve/kernels/fused.py do (every intermediate torch
 * stores in the input dtype is rounded to it here too). Built without -ffast-math and with
 * -ffp-contract=off, so products are rounded before they are added, as torch's separate ops
 * round them: the rotary is bit-identical to torch's in float32. Sums of squares may be added in
 * another order than torch's (a vectorized reduction), and expf is glibc's vector version.
 */
#include <math.h>
#include <stdint.h>

#include "dtype.h"

/* glibc's vector expf (libmvec), which GCC calls from vectorized loops only under -ffast-math
 * unless the declaration says it exists. */
__attribute__((__simd__("notinbranch"))) float expf(float);

/* Rows of at least this many elements in all are split over the threads. */
#define PARALLEL_ELEMENTS 32768

/* out = weight * round(h * rsqrt(mean(h^2) + eps)) with h = round(x + residual) stored to
 * new_residual, or h = x where residual is NULL. Strides are row strides in elements. */
void add_rms_norm(const void *x, int64_t x_stride, const void *residual, int64_t residual_stride,
                  const void *weight, void *out, int64_t out_stride, void *new_residual,
                  int64_t new_residual_stride, int64_t rows, int64_t n, float eps, int dtype)
{
    const int64_t elem = element_size(dtype);
#pragma omp parallel for if (rows * n >= PARALLEL_ELEMENTS)
    for (int64_t row = 0; row < rows; ++row) {
        float h[n];
        const char *xr = (const char *)x + row * x_stride * elem;
        for (int64_t i = 0; i < n; ++i) h[i] = load(xr, dtype, i);
        if (residual != NULL) {
            const char *rr = (const char *)residual + row * residual_stride * elem;
            char *nr = (char *)new_residual + row * new_residual_stride * elem;
            for (int64_t i = 0; i < n; ++i) {
                h[i] = round_to(h[i] + load(rr, dtype, i), dtype);
                store(nr, dtype, i, h[i]);
            }
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) sum += h[i] * h[i];
        const float inv = 1.0f / sqrtf(sum / (float)n + eps);
        char *o = (char *)out + row * out_stride * elem;
        for (int64_t i = 0; i < n; ++i)
            store(o, dtype, i, round_to(load(weight, dtype, i) * round_to(h[i] * inv, dtype), dtype));
    }
}

static inline void rotate_heads(char *x, int64_t stride_head, int64_t heads, const float *cos, const float *sin,
                                int64_t half, int dtype, int64_t elem) {
    for (int64_t h = 0; h < heads; ++h) {
        char *row = x + h * stride_head * elem;
        char *second = row + half * elem;
        for (int64_t d = 0; d < half; ++d) {
            const float x1 = load(row, dtype, d), x2 = load(second, dtype, d);
            const float a = x1 * cos[d], b = x2 * sin[d], c = x2 * cos[d], e = x1 * sin[d];
            store(row, dtype, d, round_to(a - b, dtype));
            store(second, dtype, d, round_to(c + e, dtype));
        }
    }
}

/* Rotates q [tokens, q_heads, 2 * half] and k [tokens, kv_heads, 2 * half] in place
 * (rotate-half layout) by the rows of the float32 cache cos_sin ([positions, 2 * half]: cos,
 * then sin) at `positions`. Strides in elements; the last dimension is contiguous. */
void rotary_qk(void *q, int64_t q_stride_token, int64_t q_stride_head, void *k, int64_t k_stride_token,
               int64_t k_stride_head, const float *cos_sin, int64_t cos_sin_stride, const int64_t *positions,
               int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t half, int dtype)
{
    const int64_t elem = element_size(dtype);
#pragma omp parallel for if (tokens * (q_heads + kv_heads) * half >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *cos = cos_sin + positions[t] * cos_sin_stride, *sin = cos + half;
        rotate_heads((char *)q + t * q_stride_token * elem, q_stride_head, q_heads, cos, sin, half, dtype, elem);
        rotate_heads((char *)k + t * k_stride_token * elem, k_stride_head, kv_heads, cos, sin, half, dtype, elem);
    }
}

/* out[:, i] = round(round(silu(gate[:, i])) * up[:, i]), gate_up = [gate | up] of `inner` each. */
void silu_mul(const void *gate_up, int64_t gate_up_stride, void *out, int64_t out_stride, int64_t rows,
              int64_t inner, int dtype)
{
    const int64_t elem = element_size(dtype);
#pragma omp parallel for if (rows * inner >= PARALLEL_ELEMENTS)
    for (int64_t row = 0; row < rows; ++row) {
        const char *gate = (const char *)gate_up + row * gate_up_stride * elem, *up = gate + inner * elem;
        char *o = (char *)out + row * out_stride * elem;
        float act[inner];
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) {
            const float g = load(gate, dtype, i);
            act[i] = g / (1.0f + expf(-g));
        }
        for (int64_t i = 0; i < inner; ++i)
            store(o, dtype, i, round_to(round_to(act[i], dtype) * load(up, dtype, i), dtype));
    }
}
