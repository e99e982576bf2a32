/*
 * resample.c — antialiased bilinear resampling of uint8 planes in fixed
 * point, box by box (see slide.h, sc_resample_u8).
 *
 * Why fixed point: a slide region is resampled to the training resolution,
 * and a tile-parallel rank reads only the rows its band needs. With float
 * sums (torch's interpolate) the band of a band-sized call is not bit-equal
 * to the same rows of the whole call; with integer weights and integer sums
 * every output pixel is a function of its own indices and its source pixels
 * alone, whatever part of the output a call computes.
 *
 * The filter: a triangle of half-width max(1, scale) source pixels
 * (scale = in / out), centred at output pixel j's centre (j + 0.5) * scale,
 * evaluated at source pixel centres k + 0.5 — the antialiased bilinear of
 * Pillow and of torch's interpolate(antialias=True). Weights are
 * normalised and taken to FRAC fraction bits as differences of rounded
 * cumulative sums: each >= 0, and they sum to exactly 1 << FRAC (a constant
 * image stays constant). Rows are resampled first (to uint8, rounded),
 * then columns.
 *
 * Ownership: every buffer here is allocated and freed inside one call; src
 * and dst are the caller's.
 */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define FRAC 22                  /* fraction bits of a weight */
#define MAX_EDGE (1LL << 31)     /* the largest extent along an axis */
#define MAX_THREADS 64
#define STRIP 64                 /* output rows a thread takes at a time */

/* One axis: output indices [lo, hi) of an in -> out resample; tap t of
 * output j (relative index j - lo) reads source index first[j - lo] + t
 * with weight w[off[j - lo] + t], t < off[j - lo + 1] - off[j - lo]. */
typedef struct axis {
  int64_t lo, hi;
  int64_t *first;   /* hi - lo source indices */
  int64_t *off;     /* hi - lo + 1 offsets into w */
  int32_t *w;       /* off[hi - lo] weights, each row summing to 1 << FRAC */
} axis;

static void axis_free(axis *a) {
  free(a->first);
  free(a->off);
  free(a->w);
  memset(a, 0, sizeof *a);
}

/* The taps of output index j before trimming: source indices [*k0, *k1)
 * (a range with a pixel to spare on either side: the taps kept are those
 * where tri() is not 0, as the weights evaluate it), and the filter's
 * centre and half-width. The same arithmetic for every call, so a box's
 * taps are the whole resample's. */
static void taps_of(int64_t in, int64_t out, int64_t j, int64_t *k0,
                    int64_t *k1, double *centre, double *half) {
  const double scale = (double)in / (double)out;
  const double fs = scale > 1.0 ? scale : 1.0;
  const double c = ((double)j + 0.5) * scale;
  int64_t a = (int64_t)floor(c - fs) - 1, b = (int64_t)ceil(c + fs) + 1;
  if (a < 0) a = 0;
  if (b > in) b = in;
  *k0 = a;
  *k1 = b;
  *centre = c;
  *half = fs;
}

static double tri(double t) {
  t = fabs(t);
  return t < 1.0 ? 1.0 - t : 0.0;
}

/* The weights of output index j into w (room for the untrimmed taps, see
 * axis_init): returns how many are kept, *first the source index of the
 * first (zero weights at the ends trimmed). */
static int64_t weights_of(int64_t in, int64_t out, int64_t j, int32_t *w,
                          int64_t *first) {
  int64_t k0, k1;
  double c, fs;
  taps_of(in, out, j, &k0, &k1, &c, &fs);
  int64_t a = k0, b = k1; /* trim the taps at the triangle's feet */
  while (a < b && tri(((double)a + 0.5 - c) / fs) == 0.0) a++;
  while (b > a && tri(((double)(b - 1) + 0.5 - c) / fs) == 0.0) b--;
  if (a == b) { /* no tap inside the triangle (cannot happen: the pixel
                  holding the centre is within half a pixel of it) */
    a = (int64_t)floor(c);
    if (a < k0) a = k0;
    if (a >= k1) a = k1 - 1;
    w[0] = 1 << FRAC;
    *first = a;
    return 1;
  }
  double sum = 0.0;
  for (int64_t k = a; k < b; k++) sum += tri(((double)k + 0.5 - c) / fs);
  /* rounded cumulative sums: weights >= 0 that add up to exactly
   * 1 << FRAC (the last cumulative sum is sum / sum = 1) */
  double cum = 0.0;
  int64_t prev = 0;
  for (int64_t k = a; k < b; k++) {
    cum += tri(((double)k + 0.5 - c) / fs);
    const int64_t q = k == b - 1 ? (int64_t)1 << FRAC
                                 : (int64_t)floor(cum / sum * (double)(1 << FRAC) + 0.5);
    w[k - a] = (int32_t)(q - prev);
    prev = q;
  }
  *first = a;
  return b - a;
}

/* The taps of output indices [lo, hi) (see axis). SC_OK, or SC_ERR when
 * out of memory. */
static int axis_init(axis *a, int64_t in, int64_t out, int64_t lo,
                     int64_t hi) {
  memset(a, 0, sizeof *a);
  a->lo = lo;
  a->hi = hi;
  const int64_t n = hi - lo;
  /* untrimmed taps per output index (taps_of): at most 2 * fs + 4 */
  const double fs = (double)in / (double)out > 1.0 ? (double)in / (double)out
                                                   : 1.0;
  const int64_t most = (int64_t)ceil(2.0 * fs) + 4;
  int64_t cap = 2 * n + most, used = 0;
  a->first = malloc((size_t)n * sizeof *a->first);
  a->off = malloc((size_t)(n + 1) * sizeof *a->off);
  a->w = malloc((size_t)cap * sizeof *a->w);
  if (!a->first || !a->off || !a->w) goto oom;
  for (int64_t j = lo; j < hi; j++) {
    if (used + most > cap) {
      while (used + most > cap) cap *= 2;
      int32_t *w = realloc(a->w, (size_t)cap * sizeof *w);
      if (!w) goto oom;
      a->w = w;
    }
    a->off[j - lo] = used;
    used += weights_of(in, out, j, a->w + used, &a->first[j - lo]);
  }
  a->off[n] = used;
  return SC_OK;
oom:
  axis_free(a);
  return SC_ERR;
}

/* Source span [*s0, *s1) of the output indices [lo, hi) (hi > lo). */
static void axis_span(const axis *a, int64_t lo, int64_t hi, int64_t *s0,
                      int64_t *s1) {
  int64_t x0 = INT64_MAX, x1 = INT64_MIN;
  for (int64_t j = lo; j < hi; j++) {
    const int64_t f = a->first[j - a->lo];
    const int64_t e = f + a->off[j - a->lo + 1] - a->off[j - a->lo];
    if (f < x0) x0 = f;
    if (e > x1) x1 = e;
  }
  *s0 = x0;
  *s1 = x1;
}

static int check_sizes(int64_t in, int64_t out, int64_t lo, int64_t hi,
                       const char *what, char *err, size_t errlen) {
  if (in < 1 || out < 1 || in > MAX_EDGE || out > MAX_EDGE)
    return _sc_slide_fail(err, errlen,
                          "streamcnn: resample %s: sizes %lld -> %lld must "
                          "be in [1, %lld]",
                          what, (long long)in, (long long)out,
                          (long long)MAX_EDGE);
  if (lo < 0 || hi <= lo || hi > out)
    return _sc_slide_fail(err, errlen,
                          "streamcnn: resample %s: output range [%lld, %lld) "
                          "is empty or outside [0, %lld)",
                          what, (long long)lo, (long long)hi, (long long)out);
  return SC_OK;
}

/* lo + n, saturated: a hostile box offset and extent (int64 from Python)
 * must reach check_sizes as a range it refuses, not overflow on the way
 * (UB; found by fuzz_resample). */
static int64_t end_of(int64_t lo, int64_t n) {
  int64_t hi;
  if (__builtin_add_overflow(lo, n, &hi)) return n > 0 ? INT64_MAX : INT64_MIN;
  return hi;
}

int sc_resample_span(int64_t in_size, int64_t out_size, int64_t out_lo,
                     int64_t out_hi, int64_t span[2], char *err,
                     size_t errlen) {
  if (!span) return _sc_slide_fail(err, errlen, "streamcnn: resample: no span");
  if (check_sizes(in_size, out_size, out_lo, out_hi, "span", err, errlen))
    return SC_ERR;
  /* The taps of the first and the last output index only: as j grows the
   * centre does, and the first and the last tap with tri() != 0 never move
   * back (t = (k + 0.5 - c) / fs falls with c for every k, in floating
   * point too). sc_resample_u8 checks the source part against every
   * index's taps, so a span that were short would be refused, not read
   * past. */
  axis a, b;
  if (axis_init(&a, in_size, out_size, out_lo, out_lo + 1))
    return _sc_slide_fail(err, errlen, "streamcnn: resample: out of memory");
  if (axis_init(&b, in_size, out_size, out_hi - 1, out_hi)) {
    axis_free(&a);
    return _sc_slide_fail(err, errlen, "streamcnn: resample: out of memory");
  }
  int64_t s0, s1;
  axis_span(&a, out_lo, out_lo + 1, &span[0], &span[1]);
  axis_span(&b, out_hi - 1, out_hi, &s0, &s1);
  axis_free(&a);
  axis_free(&b);
  if (s0 < span[0]) span[0] = s0;
  if (s1 > span[1]) span[1] = s1;
  return SC_OK;
}

/* --- the two passes, strip by strip --------------------------------------- */

typedef struct job {
  const sc_resample_args *p;
  axis ax, ay;          /* the box's columns and rows */
  int64_t strips;       /* STRIP-row pieces of the box, per plane */
  int64_t buf_rows;     /* the most source rows a strip reads */
  atomic_llong next;    /* next (plane, strip) to take */
  atomic_int failed;    /* a thread could not allocate its buffers */
} job;

/* A sum of weights (1 << FRAC in all) times uint8 values, with half a unit
 * for rounding, back to uint8. Weights are >= 0, so sums stay below
 * 256 << FRAC < 2^31. */
static inline uint8_t to_u8(int32_t acc) {
  acc >>= FRAC;
  return (uint8_t)(acc > 255 ? 255 : acc);
}

/* The output rows [r0, r1) of the box, one plane: the source rows they
 * read resampled to the box's columns (rows pass, into tmp), then the
 * columns pass. */
static void strip(const job *J, int64_t plane, int64_t r0, int64_t r1,
                  uint8_t *tmp, int32_t *acc) {
  const sc_resample_args *p = J->p;
  const int64_t bw = p->box_w;
  const uint8_t *src = p->src + plane * p->src_h * p->src_w;
  int64_t y0, y1;
  axis_span(&J->ay, r0, r1, &y0, &y1);
  const int64_t sx0 = p->src_x, sx1 = p->src_x + p->src_w;
  for (int64_t y = y0; y < y1; y++) {
    uint8_t *o = tmp + (y - y0) * bw;
    if (y < p->src_y || y >= p->src_y + p->src_h) { /* a row of fill */
      memset(o, p->fill[plane], (size_t)bw);
      continue;
    }
    const uint8_t *row = src + (y - p->src_y) * p->src_w;
    for (int64_t j = 0; j < bw; j++) {
      const int64_t a = J->ax.off[j], n = J->ax.off[j + 1] - a;
      const int64_t f = J->ax.first[j];
      const int32_t *w = J->ax.w + a;
      int32_t s = 1 << (FRAC - 1);
      if (f >= sx0 && f + n <= sx1) { /* every tap inside the part held */
        const uint8_t *x = row + (f - sx0);
        for (int64_t t = 0; t < n; t++) s += w[t] * x[t];
      } else { /* taps outside read the fill: their weights times it */
        const int64_t t0 = f < sx0 ? sx0 - f : 0;
        const int64_t t1 = f + n > sx1 ? (sx1 > f ? sx1 - f : 0) : n;
        int32_t held = 0;
        for (int64_t t = t0; t < t1; t++) {
          s += w[t] * row[f + t - sx0];
          held += w[t];
        }
        s += ((1 << FRAC) - held) * (int32_t)p->fill[plane];
      }
      o[j] = to_u8(s);
    }
  }
  uint8_t *dst = p->dst + plane * p->box_h * bw;
  for (int64_t i = r0; i < r1; i++) {
    const int64_t a = J->ay.off[i - J->ay.lo], n = J->ay.off[i - J->ay.lo + 1] - a;
    const int32_t *w = J->ay.w + a;
    const uint8_t *base = tmp + (J->ay.first[i - J->ay.lo] - y0) * bw;
    for (int64_t j = 0; j < bw; j++) acc[j] = 1 << (FRAC - 1);
    for (int64_t t = 0; t < n; t++) {
      const int32_t wt = w[t];
      const uint8_t *x = base + t * bw;
      for (int64_t j = 0; j < bw; j++) acc[j] += wt * x[j];
    }
    uint8_t *o = dst + (i - p->box_y) * bw;
    for (int64_t j = 0; j < bw; j++) o[j] = to_u8(acc[j]);
  }
}

/* The output rows [*r0, *r1) of strip s of the box. */
static void strip_rows(const sc_resample_args *p, int64_t s, int64_t *r0,
                       int64_t *r1) {
  const int64_t end = p->box_y + p->box_h;
  *r0 = p->box_y + s * STRIP;
  *r1 = *r0 + STRIP < end ? *r0 + STRIP : end;
}

static void *worker(void *arg) {
  job *J = arg;
  const sc_resample_args *p = J->p;
  uint8_t *tmp = malloc((size_t)(J->buf_rows * p->box_w));
  int32_t *acc = malloc((size_t)p->box_w * sizeof *acc);
  if (!tmp || !acc) {
    atomic_store(&J->failed, 1);
  } else {
    for (;;) {
      const long long k = atomic_fetch_add(&J->next, 1);
      if (k >= J->strips * p->planes || atomic_load(&J->failed)) break;
      int64_t r0, r1;
      strip_rows(p, k % J->strips, &r0, &r1);
      strip(J, k / J->strips, r0, r1, tmp, acc);
    }
  }
  free(tmp);
  free(acc);
  return NULL;
}

int sc_resample_u8(const sc_resample_args *p, char *err, size_t errlen) {
  if (!p) return _sc_slide_fail(err, errlen, "streamcnn: resample: no arguments");
  if (p->planes < 1 || p->planes > 4096)
    return _sc_slide_fail(err, errlen,
                          "streamcnn: resample: planes %lld must be in "
                          "[1, 4096]",
                          (long long)p->planes);
  if (check_sizes(p->in_h, p->out_h, p->box_y, end_of(p->box_y, p->box_h),
                  "rows", err, errlen) ||
      check_sizes(p->in_w, p->out_w, p->box_x, end_of(p->box_x, p->box_w),
                  "columns", err, errlen))
    return SC_ERR;
  int64_t t1, t2;
  if (!p->src || !p->dst)
    return _sc_slide_fail(err, errlen, "streamcnn: resample: no source or "
                                       "destination buffer");
  if (p->src_h < 1 || p->src_w < 1 || p->src_y < 0 || p->src_x < 0 ||
      p->src_h > p->in_h - p->src_y || p->src_w > p->in_w - p->src_x)
    return _sc_slide_fail(err, errlen,
                          "streamcnn: resample: source box at (%lld, %lld), "
                          "%lld x %lld (rows x columns), is not inside the "
                          "%lld x %lld source",
                          (long long)p->src_y, (long long)p->src_x,
                          (long long)p->src_h, (long long)p->src_w,
                          (long long)p->in_h, (long long)p->in_w);
  if (__builtin_mul_overflow(p->src_h, p->src_w, &t1) ||
      __builtin_mul_overflow(t1, p->planes, &t2) ||
      __builtin_mul_overflow(p->box_h, p->box_w, &t1) ||
      __builtin_mul_overflow(t1, p->planes, &t2))
    return _sc_slide_fail(err, errlen,
                          "streamcnn: resample: the buffers' sizes overflow");
  job J;
  memset(&J, 0, sizeof J);
  J.p = p;
  if (axis_init(&J.ax, p->in_w, p->out_w, p->box_x, p->box_x + p->box_w) ||
      axis_init(&J.ay, p->in_h, p->out_h, p->box_y, p->box_y + p->box_h)) {
    axis_free(&J.ax);
    return _sc_slide_fail(err, errlen, "streamcnn: resample: out of memory");
  }
  /* the source box must hold what the output box reads (with a fill, the
   * rest of the source is that) */
  int64_t r0, r1, c0, c1;
  axis_span(&J.ay, p->box_y, p->box_y + p->box_h, &r0, &r1);
  axis_span(&J.ax, p->box_x, p->box_x + p->box_w, &c0, &c1);
  if (!p->fill && (r0 < p->src_y || r1 > p->src_y + p->src_h || c0 < p->src_x ||
      c1 > p->src_x + p->src_w)) {
    axis_free(&J.ax);
    axis_free(&J.ay);
    return _sc_slide_fail(
        err, errlen,
        "streamcnn: resample: the output box reads source rows [%lld, %lld) "
        "and columns [%lld, %lld), but the source box holds rows [%lld, "
        "%lld) and columns [%lld, %lld)",
        (long long)r0, (long long)r1, (long long)c0, (long long)c1,
        (long long)p->src_y, (long long)(p->src_y + p->src_h),
        (long long)p->src_x, (long long)(p->src_x + p->src_w));
  }
  J.strips = (p->box_h + STRIP - 1) / STRIP;
  for (int64_t s = 0; s < J.strips; s++) {
    int64_t r0, r1, y0, y1;
    strip_rows(p, s, &r0, &r1);
    axis_span(&J.ay, r0, r1, &y0, &y1);
    if (y1 - y0 > J.buf_rows) J.buf_rows = y1 - y0;
  }
  atomic_init(&J.next, 0);
  atomic_init(&J.failed, 0);
  int threads = p->threads < 1 ? 1 : p->threads > MAX_THREADS ? MAX_THREADS
                                                              : p->threads;
  if (threads > J.strips * p->planes) threads = (int)(J.strips * p->planes);
  pthread_t tid[MAX_THREADS];
  int started = 0;
  for (int t = 1; t < threads; t++)
    if (pthread_create(&tid[started], NULL, worker, &J) == 0) started++;
  worker(&J); /* this thread works too */
  for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
  axis_free(&J.ax);
  axis_free(&J.ay);
  if (atomic_load(&J.failed))
    return _sc_slide_fail(err, errlen, "streamcnn: resample: out of memory "
                                       "(a strip buffer)");
  return SC_OK;
}
