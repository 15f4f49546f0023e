/* Paged KV on CPU: the KV write of a step's tokens, and decode attention: one new query token
 * per sequence, its keys and values read in place through the block table, each block's K and V
 * once for all the sequence's heads (a block is one contiguous run of memory: [block_size,
 * kv_heads, dim]), the softmax computed online block by block.
 *
 * Built by kunserve/kernels/native.py with -O3 -march=native -ffast-math -fopenmp: the fast-math
 * flags let GCC vectorize the dot products' reductions and expf (through glibc's libmvec). No
 * infinity or NaN is ever formed, as -ffast-math assumes: only visible keys are visited and the
 * running max starts finite.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"

/* `n` elements at `src` as float32: `src` itself for float32, else widened into `buf`. */
static inline const float *as_float(const void *src, int dtype, float *buf, int64_t n) {
    if (dtype == DTYPE_FLOAT32) return (const float *)src;
    for (int64_t i = 0; i < n; ++i) buf[i] = load(src, dtype, i);
    return buf;
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

/* Folds a block's raw scores s[t0:t1] of one head into its running softmax: s becomes the
 * block's probabilities relative to the new running max, and the head's accumulated output and
 * denominator are rescaled to that max. */
static inline void softmax_block(float *s, int64_t t0, int64_t t1, float *running_max, float *denom,
                                 float *acc, int64_t dim) {
    float block_max = *running_max;
    for (int64_t t = t0; t < t1; ++t) block_max = s[t] > block_max ? s[t] : block_max;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = t0; t < t1; ++t) {
        s[t] = expf(s[t] - block_max);
        sum += s[t];
    }
    /* The first visible block has nothing to rescale (and the max it starts from is no bound). */
    const float rescale = *denom > 0.0f ? expf(*running_max - block_max) : 0.0f;
    *denom = *denom * rescale + sum;
    *running_max = block_max;
    if (rescale != 1.0f)
        for (int64_t d = 0; d < dim; ++d) acc[d] *= rescale;
}

/* out[i, h] = softmax(q[i, h] . K_i^T * scale) V_i over the visible keys of sequence i: the
 * first context_lens[i], or the last `window` of them when window > 0; query head h reads kv
 * head h / (num_heads / num_kv_heads). Strides are in elements; the last dimension of q, kv and
 * out is contiguous. kv is one layer: [blocks, 2 (K, V), block_size, kv_heads, dim]. */
void paged_decode_attention(
    const void *q, int64_t q_stride_seq, int64_t q_stride_head,
    const void *kv, int64_t kv_stride_block, int64_t kv_stride_kv, int64_t kv_stride_slot, int64_t kv_stride_head,
    const int64_t *block_tables, int64_t tables_stride_seq, const int64_t *context_lens,
    void *out, int64_t out_stride_seq, int64_t out_stride_head,
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t block_size,
    int64_t window, float scale, int dtype)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t elem = element_size(dtype);
    const char *kv_bytes = (const char *)kv;
    /* One sequence per work item, handed out dynamically: contexts differ in length. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t seq = 0; seq < num_seqs; ++seq) {
        float queries[num_heads * dim], acc[num_heads * dim], row_buf[dim];
        float scores[num_heads * block_size], running_max[num_heads], denom[num_heads];
        for (int64_t h = 0; h < num_heads; ++h) {
            const char *src = (const char *)q + (seq * q_stride_seq + h * q_stride_head) * elem;
            const float *row = as_float(src, dtype, row_buf, dim);
            for (int64_t d = 0; d < dim; ++d) queries[h * dim + d] = row[d] * scale;
            running_max[h] = -FLT_MAX;
            denom[h] = 0.0f;
        }
        memset(acc, 0, sizeof acc);
        const int64_t len = context_lens[seq];
        const int64_t first = window > 0 && len > window ? len - window : 0;
        for (int64_t blk = first / block_size; blk * block_size < len; ++blk) {
            const int64_t start = blk * block_size;
            const int64_t t0 = first > start ? first - start : 0;
            const int64_t t1 = len - start < block_size ? len - start : block_size;
            const char *keys = kv_bytes + block_tables[seq * tables_stride_seq + blk] * kv_stride_block * elem;
            const char *values = keys + kv_stride_kv * elem;
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
                    const char *src = keys + (t * kv_stride_slot + kvh * kv_stride_head) * elem;
                    const float *key = as_float(src, dtype, row_buf, dim);
                    for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
                        scores[h * block_size + t] = dot(queries + h * dim, key, dim);
                }
            for (int64_t h = 0; h < num_heads; ++h)
                softmax_block(scores + h * block_size, t0, t1, running_max + h, denom + h, acc + h * dim, dim);
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
                    const char *src = values + (t * kv_stride_slot + kvh * kv_stride_head) * elem;
                    const float *value = as_float(src, dtype, row_buf, dim);
                    for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
                        const float p = scores[h * block_size + t];
                        float *a = acc + h * dim;
#pragma omp simd
                        for (int64_t d = 0; d < dim; ++d) a[d] += p * value[d];
                    }
                }
        }
        for (int64_t h = 0; h < num_heads; ++h) {
            const float inv = 1.0f / denom[h];
            const int64_t row = seq * out_stride_seq + h * out_stride_head;
            for (int64_t d = 0; d < dim; ++d) store(out, dtype, row + d, round_to(acc[h * dim + d] * inv, dtype));
        }
    }
}

/* Copies each token's key and value rows (`row` elements: all its kv heads, contiguous) into
 * its slot: offset slot_offsets[t] of block slot_blocks[t] of the layer's KV. */
void write_kv(const void *k, int64_t k_stride_token, const void *v, int64_t v_stride_token, void *kv,
              int64_t kv_stride_block, int64_t kv_stride_kv, int64_t kv_stride_slot, const int64_t *slot_blocks,
              const int64_t *slot_offsets, int64_t tokens, int64_t row, int dtype)
{
    const int64_t elem = element_size(dtype);
    for (int64_t t = 0; t < tokens; ++t) {
        char *key = (char *)kv + (slot_blocks[t] * kv_stride_block + slot_offsets[t] * kv_stride_slot) * elem;
        memcpy(key, (const char *)k + t * k_stride_token * elem, row * elem);
        memcpy(key + kv_stride_kv * elem, (const char *)v + t * v_stride_token * elem, row * elem);
    }
}
