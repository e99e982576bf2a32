/*
 * tile.c — CPU tile kernels (see kernels/tile.h). Rows of the N x C x H
 * planes are split over torch's intra-op thread pool (torch_parallel_for),
 * so the kernels use the same threads as the ATen ops around them.
 */
#include "tile.h"

#include "abi.h"

#include <math.h>

/* Rows handed to one task: about 32k elements of work. */
static int64_t grain_rows(int64_t row_len) {
  int64_t g = row_len > 0 ? 32768 / row_len : 1;
  return g > 0 ? g : 1;
}

/* ---- copy / accumulate ---------------------------------------------------- */

#define COPY_ROWS(T)                                                          \
  static void copy_rows_##T(int64_t begin, int64_t end, void *ctx) {          \
    const sc_copy_params *p = ctx;                                            \
    const int64_t C = p->size[1], H = p->size[2], W = p->size[3];             \
    for (int64_t r = begin; r < end; r++) {                                   \
      const int64_t y = r % H, c = (r / H) % C, n = r / (H * C);              \
      const T *s = (const T *)p->src + n * p->src_stride[0] +                 \
                   c * p->src_stride[1] + y * p->src_stride[2];               \
      T *d = (T *)p->dst + n * p->dst_stride[0] + c * p->dst_stride[1] +      \
             y * p->dst_stride[2];                                            \
      const int64_t ss = p->src_stride[3], ds = p->dst_stride[3];             \
      if (p->accumulate) {                                                    \
        if (ss == 1 && ds == 1)                                               \
          for (int64_t x = 0; x < W; x++) d[x] += s[x];                       \
        else                                                                  \
          for (int64_t x = 0; x < W; x++) d[x * ds] += s[x * ss];             \
      } else {                                                                \
        if (ss == 1 && ds == 1)                                               \
          for (int64_t x = 0; x < W; x++) d[x] = s[x];                        \
        else                                                                  \
          for (int64_t x = 0; x < W; x++) d[x * ds] = s[x * ss];              \
      }                                                                       \
    }                                                                         \
  }

COPY_ROWS(float)
COPY_ROWS(double)

int sc_copy_cpu(const sc_copy_params *p) {
  if (sc_copy_check(p)) return 1;
  const int64_t rows = p->size[0] * p->size[1] * p->size[2];
  if (rows == 0 || p->size[3] == 0) return 0;
  ParallelFunc fn = p->dtype == SC_DTYPE_F32 ? copy_rows_float
                                             : copy_rows_double;
  return torch_parallel_for(0, rows, grain_rows(p->size[3]), fn, (void *)p)
             ? 1
             : 0;
}

/* ---- gather with border padding -------------------------------------------- */

#define GATHER_ROWS(T)                                                        \
  static void gather_rows_##T(int64_t begin, int64_t end, void *ctx) {        \
    const sc_gather_params *p = ctx;                                          \
    const T pad = (T)p->pad_value;                                            \
    const int64_t H = p->dst_h, W = p->dst_w;                                 \
    for (int64_t r = begin; r < end; r++) {                                   \
      const int64_t y = r % H, c = (r / H) % p->c, n = r / (H * p->c);        \
      T *d = (T *)p->dst + r * W;                                             \
      const int64_t sy = y - p->off_h;                                        \
      if (sy < 0 || sy >= p->src_h || p->src_w == 0) {                        \
        for (int64_t x = 0; x < W; x++) d[x] = pad;                           \
        continue;                                                             \
      }                                                                       \
      const T *s = (const T *)p->src + n * p->src_stride[0] +                 \
                   c * p->src_stride[1] + sy * p->src_stride[2];              \
      const int64_t ss = p->src_stride[3];                                    \
      for (int64_t x = 0; x < p->off_w; x++) d[x] = pad;                      \
      T *dm = d + p->off_w;                                                   \
      if (ss == 1)                                                            \
        for (int64_t x = 0; x < p->src_w; x++) dm[x] = s[x];                  \
      else                                                                    \
        for (int64_t x = 0; x < p->src_w; x++) dm[x] = s[x * ss];             \
      for (int64_t x = p->off_w + p->src_w; x < W; x++) d[x] = pad;           \
    }                                                                         \
  }

GATHER_ROWS(float)
GATHER_ROWS(double)

int sc_gather_cpu(const sc_gather_params *p) {
  if (sc_gather_check(p)) return 1;
  const int64_t rows = p->n * p->c * p->dst_h;
  if (rows == 0 || p->dst_w == 0) return 0;
  ParallelFunc fn = p->dtype == SC_DTYPE_F32 ? gather_rows_float
                                             : gather_rows_double;
  return torch_parallel_for(0, rows, grain_rows(p->dst_w), fn, (void *)p)
             ? 1
             : 0;
}
