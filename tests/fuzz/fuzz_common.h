/*
 * fuzz_common.h — shared by the libFuzzer targets in tests/fuzz/.
 *
 * Input layouts (little-endian):
 *   program:  int64 words, the whole input (a trailing partial word is
 *             dropped).
 *   geometry, memory: a 24-byte header of six uint32 (h, w, tile_h, tile_w,
 *             flags, mask) followed by the program's int64 words.
 * FZ_CHECK marks a broken invariant: it prints the expression and traps, so
 * libFuzzer (and the corpus driver, driver.c) records the input as a crash.
 */
#ifndef SC_FUZZ_COMMON_H
#define SC_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_CHECK(cond)                                                      \
  do {                                                                      \
    if (!(cond)) {                                                          \
      fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__,  \
              #cond);                                                       \
      __builtin_trap();                                                     \
    }                                                                       \
  } while (0)

/* Copy of the input as int64 words (the input need not be aligned); free
 * the result. *n = number of whole words. */
static inline int64_t *fz_words(const uint8_t *data, size_t size, int64_t *n) {
  *n = (int64_t)(size / 8);
  int64_t *w = malloc((size_t)(*n ? *n : 1) * sizeof *w);
  if (w && *n) memcpy(w, data, (size_t)*n * 8);
  return w;
}

typedef struct fz_params {
  int64_t h, w, tile_h, tile_w;
  uint32_t flags, mask;
} fz_params;

#define FZ_HEADER 24

static inline uint32_t fz_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
         (uint32_t)p[3] << 24;
}

/* Extents from the header: flags bit 0 selects huge extents (1 .. 2^31),
 * else small ones (1 .. 2048 for the image, 1 .. 4096 for the tile). */
static inline int fz_params_read(const uint8_t *data, size_t size,
                                 fz_params *q) {
  if (size < FZ_HEADER) return 0;
  q->flags = fz_u32(data + 16);
  q->mask = fz_u32(data + 20);
  const int huge = q->flags & 1;
  const uint32_t img = huge ? 0x7fffffffu : 2047u, tl = huge ? 0x7fffffffu
                                                              : 4095u;
  q->h = (int64_t)(fz_u32(data) & img) + 1;
  q->w = (int64_t)(fz_u32(data + 4) & img) + 1;
  q->tile_h = (int64_t)(fz_u32(data + 8) & tl) + 1;
  q->tile_w = (int64_t)(fz_u32(data + 12) & tl) + 1;
  return 1;
}

#endif
