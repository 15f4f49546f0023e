/* The element types the CPU kernels read and write, and their conversions to and from float32.
 * The codes are kunserve/kernels/native.py's DTYPE_CODES. */
#ifndef KUNSERVE_DTYPE_H
#define KUNSERVE_DTYPE_H

#include <stdint.h>
#include <string.h>

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

static inline int64_t element_size(int dtype) { return dtype == DTYPE_FLOAT32 ? 4 : 2; }

static inline float load(const void *p, int dtype, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* `value` rounded to the dtype's precision (to nearest even, as torch rounds), still a float. */
static inline float round_to(float value, int dtype) {
    if (dtype == DTYPE_FLOAT32) return value;
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Stores a value already rounded to the dtype. */
static inline void store(void *p, int dtype, int64_t i, float value) {
    if (dtype == DTYPE_FLOAT32) {
        ((float *)p)[i] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    ((uint16_t *)p)[i] = (uint16_t)(bits >> 16);
}

#endif
