/*
 * half.h — IEEE binary16 (float16) and bfloat16 <-> float32 conversions in
 * plain C (bit manipulation; round to nearest, ties to even; NaN stays NaN,
 * infinities and subnormals are handled). Used by the CPU tile kernels and
 * the replay for tensors of those dtypes; tests/c/test_half.c checks them.
 */
#ifndef STREAMCNN_KERNELS_HALF_H
#define STREAMCNN_KERNELS_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t sc_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float sc_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float sc_bf16_to_f32(uint16_t h) {
  return sc_bits_f32((uint32_t)h << 16);
}

static inline uint16_t sc_f32_to_bf16(float f) {
  const uint32_t u = sc_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet and a NaN */
    return (uint16_t)((u >> 16) | 0x0040u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float sc_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) /* inf / NaN */
    return sc_bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) { /* zero / subnormal: man * 2^-24 */
    float v = (float)man * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return sc_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t sc_f32_to_f16(float f) {
  const uint32_t u = sc_f32_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: inf */
  if (a < 0x38800000u) { /* below 2^-14: subnormal (or zero) */
    /* value / 2^-24, rounded to nearest even, as an integer 0 .. 1024 */
    const uint32_t e = a >> 23;
    if (e < 102) return sign; /* < 2^-25: rounds to zero */
    const uint32_t m = (a & 0x7fffffu) | 0x800000u; /* 24-bit significand */
    const uint32_t shift = 126 - e;                   /* 14 .. 24 */
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
  /* normal: rebias the exponent, round the 13 dropped bits to even */
  uint32_t r = a - 0x38000000u; /* exponent 127 -> 15 */
  r += 0x0fffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

#endif /* STREAMCNN_KERNELS_HALF_H */
