/*
 * tile.c — CPU tile kernels (see kernels/tile.h). Rows of the N x C x H
 * planes are split over torch's intra-op thread pool (torch_parallel_for),
 * so the kernels use the same threads as the ATen ops around them.
 */
#include "tile.h"

#include "abi.h"
#include "half.h"

#include <math.h>

/* Rows handed to one task: about 32k elements of work. */
static int64_t grain_rows(int64_t row_len) {
  int64_t g = row_len > 0 ? 32768 / row_len : 1;
  return g > 0 ? g : 1;
}

/* ---- copy / accumulate ---------------------------------------------------- */

/* One task row = one run of `len` elements along dimension `inner` (3 = W
 * for NCHW-like destinations, 1 = C for channels-last ones), indexed by
 * the other three dimensions in N, C, H, W order. */
typedef struct copy_task {
  const sc_copy_params *p;
  int inner;        /* dimension walked by the innermost loop */
  int outer[3];     /* the other three, slowest first */
} copy_task;

#define COPY_ROWS(T)                                                          \
  static void copy_rows_##T(int64_t begin, int64_t end, void *ctx) {          \
    const copy_task *t = ctx;                                                 \
    const sc_copy_params *p = t->p;                                           \
    const int64_t n1 = p->size[t->outer[1]], n2 = p->size[t->outer[2]];       \
    const int64_t len = p->size[t->inner];                                    \
    const int64_t ss = p->src_stride[t->inner], ds = p->dst_stride[t->inner]; \
    for (int64_t r = begin; r < end; r++) {                                   \
      const int64_t i2 = r % n2, i1 = (r / n2) % n1, i0 = r / (n2 * n1);      \
      const T *s = (const T *)p->src + i0 * p->src_stride[t->outer[0]] +      \
                   i1 * p->src_stride[t->outer[1]] +                          \
                   i2 * p->src_stride[t->outer[2]];                           \
      T *d = (T *)p->dst + i0 * p->dst_stride[t->outer[0]] +                  \
             i1 * p->dst_stride[t->outer[1]] + i2 * p->dst_stride[t->outer[2]]; \
      if (p->accumulate) {                                                    \
        if (ss == 1 && ds == 1)                                               \
          for (int64_t x = 0; x < len; x++) d[x] += s[x];                     \
        else                                                                  \
          for (int64_t x = 0; x < len; x++) d[x * ds] += s[x * ss];           \
      } else {                                                                \
        if (ss == 1 && ds == 1)                                               \
          for (int64_t x = 0; x < len; x++) d[x] = s[x];                      \
        else                                                                  \
          for (int64_t x = 0; x < len; x++) d[x * ds] = s[x * ss];            \
      }                                                                       \
    }                                                                         \
  }

COPY_ROWS(float)
COPY_ROWS(double)

/* ---- any dtypes: elementwise through double ---------------------------------- */

static inline double ld(int dt, const void *p, int64_t i) {
  switch (dt) {
  case SC_DTYPE_F32: return ((const float *)p)[i];
  case SC_DTYPE_F64: return ((const double *)p)[i];
  case SC_DTYPE_U8: return ((const uint8_t *)p)[i];
  case SC_DTYPE_F16: return sc_f16_to_f32(((const uint16_t *)p)[i]);
  default: return sc_bf16_to_f32(((const uint16_t *)p)[i]);
  }
}

static inline void st(int dt, void *p, int64_t i, double v) {
  switch (dt) {
  case SC_DTYPE_F32: ((float *)p)[i] = (float)v; break;
  case SC_DTYPE_F64: ((double *)p)[i] = v; break;
  case SC_DTYPE_F16: ((uint16_t *)p)[i] = sc_f32_to_f16((float)v); break;
  default: ((uint16_t *)p)[i] = sc_f32_to_bf16((float)v); break;
  }
}

static void copy_rows_any(int64_t begin, int64_t end, void *ctx) {
  const copy_task *t = ctx;
  const sc_copy_params *p = t->p;
  const int sdt = p->src_dtype ? p->src_dtype : p->dtype, ddt = p->dtype;
  const int64_t n1 = p->size[t->outer[1]], n2 = p->size[t->outer[2]];
  const int64_t len = p->size[t->inner];
  const int64_t ss = p->src_stride[t->inner], ds = p->dst_stride[t->inner];
  for (int64_t r = begin; r < end; r++) {
    const int64_t i2 = r % n2, i1 = (r / n2) % n1, i0 = r / (n2 * n1);
    const int64_t so = i0 * p->src_stride[t->outer[0]] +
                       i1 * p->src_stride[t->outer[1]] +
                       i2 * p->src_stride[t->outer[2]];
    const int64_t dof = i0 * p->dst_stride[t->outer[0]] +
                        i1 * p->dst_stride[t->outer[1]] +
                        i2 * p->dst_stride[t->outer[2]];
    for (int64_t x = 0; x < len; x++) {
      double v = ld(sdt, p->src, so + x * ss);
      if (p->accumulate) v += ld(ddt, p->dst, dof + x * ds);
      st(ddt, p->dst, dof + x * ds, v);
    }
  }
}

/* f32 / f64 with the same dtype on both sides: the typed loops */
static int plain_float(int dtype, int src_dtype) {
  return (dtype == SC_DTYPE_F32 || dtype == SC_DTYPE_F64) &&
         (src_dtype == 0 || src_dtype == dtype);
}

/* Can dimension a (outer) be folded into the innermost run along dimension
 * i: both sides contiguous along i and a directly following it? */
static int folds(const sc_copy_params *p, int i, int a) {
  return p->src_stride[i] == 1 && p->dst_stride[i] == 1 &&
         p->src_stride[a] == p->size[i] && p->dst_stride[a] == p->size[i];
}

int sc_copy_cpu(const sc_copy_params *p_in) {
  if (sc_copy_check(p_in)) return 1;
  sc_copy_params q = *p_in;
  const sc_copy_params *p = &q;
  copy_task t = {p, 3, {0, 1, 2}};
  /* channels-last destination: walk C innermost, contiguous in memory */
  if (q.size[1] > 1 && q.dst_stride[1] == 1 && q.dst_stride[3] != 1)
    t = (copy_task){p, 1, {0, 2, 3}};
  /* whole rows on both sides (W after C channels-last, H after W in NCHW):
   * one long run instead of many short ones */
  if (t.inner == 1 && folds(&q, 1, 3)) {
    q.size[1] *= q.size[3];
    q.size[3] = 1;
  } else if (t.inner == 3 && folds(&q, 3, 2)) {
    q.size[3] *= q.size[2];
    q.size[2] = 1;
  }
  const int64_t rows =
      p->size[t.outer[0]] * p->size[t.outer[1]] * p->size[t.outer[2]];
  if (rows == 0 || p->size[t.inner] == 0) return 0;
  ParallelFunc fn = !plain_float(p->dtype, p->src_dtype) ? copy_rows_any
                    : p->dtype == SC_DTYPE_F32           ? copy_rows_float
                                                         : copy_rows_double;
  return torch_parallel_for(0, rows, grain_rows(p->size[t.inner]), fn, &t)
             ? 1
             : 0;
}

/* ---- gather with border padding -------------------------------------------- */

/* NCHW destination: one task row = one (n, c, y) row of dst_w elements. */
#define GATHER_ROWS(T, S, NAME)                                               \
  static void NAME(int64_t begin, int64_t end, void *ctx) {                   \
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
      const S *s = (const S *)p->src + n * p->src_stride[0] +                 \
                   c * p->src_stride[1] + sy * p->src_stride[2];              \
      const int64_t ss = p->src_stride[3];                                    \
      for (int64_t x = 0; x < p->off_w; x++) d[x] = pad;                      \
      T *dm = d + p->off_w;                                                   \
      if (ss == 1)                                                            \
        for (int64_t x = 0; x < p->src_w; x++) dm[x] = (T)s[x];               \
      else                                                                    \
        for (int64_t x = 0; x < p->src_w; x++) dm[x] = (T)s[x * ss];          \
      for (int64_t x = p->off_w + p->src_w; x < W; x++) d[x] = pad;           \
    }                                                                         \
  }

/* NHWC destination: one task row = one (n, y) row of dst_w * c elements. */
#define GATHER_ROWS_NHWC(T, S, NAME)                                          \
  static void NAME(int64_t begin, int64_t end, void *ctx) {                   \
    const sc_gather_params *p = ctx;                                          \
    const T pad = (T)p->pad_value;                                            \
    const int64_t H = p->dst_h, W = p->dst_w, C = p->c;                       \
    for (int64_t r = begin; r < end; r++) {                                   \
      const int64_t y = r % H, n = r / H, sy = y - p->off_h;                  \
      T *d = (T *)p->dst + r * W * C;                                         \
      const int in_rows = sy >= 0 && sy < p->src_h;                           \
      for (int64_t x = 0; x < W; x++) {                                       \
        const int64_t sx = x - p->off_w;                                      \
        T *dc = d + x * C;                                                    \
        if (!in_rows || sx < 0 || sx >= p->src_w) {                           \
          for (int64_t c = 0; c < C; c++) dc[c] = pad;                        \
          continue;                                                           \
        }                                                                     \
        const S *s = (const S *)p->src + n * p->src_stride[0] +               \
                     sy * p->src_stride[2] + sx * p->src_stride[3];           \
        for (int64_t c = 0; c < C; c++) dc[c] = (T)s[c * p->src_stride[1]];   \
      }                                                                       \
    }                                                                         \
  }

GATHER_ROWS(float, float, gather_rows_float)
GATHER_ROWS(double, double, gather_rows_double)
GATHER_ROWS(float, uint8_t, gather_rows_u8_float)
GATHER_ROWS(double, uint8_t, gather_rows_u8_double)
GATHER_ROWS_NHWC(float, float, gather_rows_nhwc_float)
GATHER_ROWS_NHWC(double, double, gather_rows_nhwc_double)
GATHER_ROWS_NHWC(float, uint8_t, gather_rows_nhwc_u8_float)
GATHER_ROWS_NHWC(double, uint8_t, gather_rows_nhwc_u8_double)

/* Any dtypes (half precision, conversions): one (n, y) row of the
 * destination per task row, elementwise through double. With scale /
 * shift, v * scale[c] + shift[c] is formed in double for float64, else in
 * float (as ATen's float / half convolutions accumulate), rounded once. */
static void gather_rows_any(int64_t begin, int64_t end, void *ctx) {
  const sc_gather_params *p = ctx;
  const int sdt = p->src_dtype ? p->src_dtype : p->dtype, ddt = p->dtype;
  const int adt = p->affine_dtype ? p->affine_dtype : ddt;
  const int wide = ddt == SC_DTYPE_F64;
  const int64_t H = p->dst_h, W = p->dst_w, C = p->c;
  for (int64_t r = begin; r < end; r++) {
    const int64_t y = r % H, n = r / H, sy = y - p->off_h;
    const int in_rows = sy >= 0 && sy < p->src_h;
    for (int64_t c = 0; c < C; c++) {
      const double a = p->scale ? ld(adt, p->scale, c * p->scale_stride) : 1.0;
      const double b = p->shift ? ld(adt, p->shift, c * p->shift_stride) : 0.0;
      for (int64_t x = 0; x < W; x++) {
        const int64_t sx = x - p->off_w;
        const int64_t di = p->channels_last ? ((n * H + y) * W + x) * C + c
                                            : ((n * C + c) * H + y) * W + x;
        double v = p->pad_value;
        if (in_rows && sx >= 0 && sx < p->src_w) {
          v = ld(sdt, p->src,
                 n * p->src_stride[0] + c * p->src_stride[1] +
                     sy * p->src_stride[2] + sx * p->src_stride[3]);
          if (p->scale)
            v = wide ? v * a + b : (double)((float)v * (float)a + (float)b);
        }
        st(ddt, p->dst, di, v);
      }
    }
  }
}

/* Scale / shift for float32 / float64 tiles from pixels of that dtype or
 * uint8, constants of the tile's dtype: typed loops, in the tile's dtype. */
#define GATHER_AFFINE(T, S, NAME)                                             \
  static void NAME(int64_t begin, int64_t end, void *ctx) {                   \
    const sc_gather_params *p = ctx;                                          \
    const T *a = p->scale, *b = p->shift, pad = (T)p->pad_value;              \
    const int64_t H = p->dst_h, W = p->dst_w, C = p->c;                       \
    const int64_t s1 = p->src_stride[1], s3 = p->src_stride[3];               \
    const int64_t x0 = p->off_w, x1 = p->off_w + p->src_w;                    \
    for (int64_t r = begin; r < end; r++) {                                   \
      const int64_t y = r % H, n = r / H, sy = y - p->off_h;                  \
      const int in_rows = sy >= 0 && sy < p->src_h;                           \
      const S *srow = (const S *)p->src + n * p->src_stride[0] +              \
                      sy * p->src_stride[2] - x0 * s3;                        \
      for (int64_t c = 0; c < C; c++) {                                       \
        const T ac = a[c * p->scale_stride];                                  \
        const T bc = b ? b[c * p->shift_stride] : (T)0;                       \
        const S *sc = srow + c * s1;                                          \
        T *d;                                                                 \
        int64_t step;                                                         \
        if (p->channels_last) {                                               \
          d = (T *)p->dst + r * W * C + c;                                    \
          step = C;                                                           \
        } else {                                                              \
          d = (T *)p->dst + ((n * C + c) * H + y) * W;                        \
          step = 1;                                                           \
        }                                                                     \
        if (!in_rows) {                                                       \
          for (int64_t x = 0; x < W; x++) d[x * step] = pad;                  \
          continue;                                                           \
        }                                                                     \
        for (int64_t x = 0; x < x0; x++) d[x * step] = pad;                   \
        for (int64_t x = x0; x < x1; x++)                                     \
          d[x * step] = (T)sc[x * s3] * ac + bc;                              \
        for (int64_t x = x1; x < W; x++) d[x * step] = pad;                   \
      }                                                                       \
    }                                                                         \
  }

GATHER_AFFINE(float, float, gather_affine_float)
GATHER_AFFINE(double, double, gather_affine_double)
GATHER_AFFINE(float, uint8_t, gather_affine_u8_float)
GATHER_AFFINE(double, uint8_t, gather_affine_u8_double)

int sc_gather_cpu(const sc_gather_params *p) {
  if (sc_gather_check(p)) return 1;
  const int f32 = p->dtype == SC_DTYPE_F32, u8 = p->src_dtype == SC_DTYPE_U8;
  /* typed loops: float32 / float64 tiles from pixels of that dtype or uint8 */
  const int typed = plain_float(p->dtype, p->src_dtype) ||
                    (u8 && (f32 || p->dtype == SC_DTYPE_F64));
  /* task rows: (n, y) rows of dst_w x c elements, but (n, c, y) rows of
   * dst_w for the plain NCHW loops */
  int64_t rows = p->n * p->dst_h, row_len = p->dst_w * p->c;
  ParallelFunc fn = gather_rows_any;
  if (p->scale) { /* normalised */
    if (typed && !p->affine_dtype)
      fn = u8 ? (f32 ? gather_affine_u8_float : gather_affine_u8_double)
              : (f32 ? gather_affine_float : gather_affine_double);
  } else if (typed && p->channels_last) {
    fn = u8 ? (f32 ? gather_rows_nhwc_u8_float : gather_rows_nhwc_u8_double)
            : (f32 ? gather_rows_nhwc_float : gather_rows_nhwc_double);
  } else if (typed) {
    rows = p->n * p->c * p->dst_h;
    row_len = p->dst_w;
    fn = u8 ? (f32 ? gather_rows_u8_float : gather_rows_u8_double)
            : (f32 ? gather_rows_float : gather_rows_double);
  }
  if (rows == 0 || row_len == 0) return 0;
  return torch_parallel_for(0, rows, grain_rows(row_len), fn, (void *)p) ? 1
                                                                        : 0;
}
