/* test_resample.c — io/resample.c: any box of a resample equals the same
 * box of the whole resample bit for bit; the whole agrees with a float64
 * evaluation of the same filter (two roundings: within 1); constants stay
 * constant, equal sizes copy; the spans are exact (one source pixel less
 * on either side is refused); bad arguments are refused with a message. */
#include "slide.h"
#include "testutil.h"

#include <math.h>
#include <stdlib.h>

static uint64_t g_rng = 88172645463325252ULL;
static uint64_t rnd(void) { /* xorshift64 */
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return g_rng;
}
static int64_t rnd_in(int64_t lo, int64_t hi) { /* [lo, hi] */
  return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1));
}

/* box (y, x, h, w) of the in_h x in_w -> out_h x out_w resample of src
 * (planes x in_h x in_w), reading only the source part its spans need */
static int resample_box(const uint8_t *src, int64_t planes, int64_t in_h,
                        int64_t in_w, int64_t out_h, int64_t out_w, int64_t y,
                        int64_t x, int64_t h, int64_t w, uint8_t *dst,
                        int threads) {
  char err[256] = "";
  int64_t sr[2], sc[2];
  if (sc_resample_span(in_h, out_h, y, y + h, sr, err, sizeof err) ||
      sc_resample_span(in_w, out_w, x, x + w, sc, err, sizeof err)) {
    fprintf(stderr, "%s\n", err);
    return SC_ERR;
  }
  const int64_t ph = sr[1] - sr[0], pw = sc[1] - sc[0];
  uint8_t *part = malloc((size_t)(planes * ph * pw));
  for (int64_t p = 0; p < planes; p++)
    for (int64_t r = 0; r < ph; r++)
      memcpy(part + (p * ph + r) * pw,
             src + (p * in_h + sr[0] + r) * in_w + sc[0], (size_t)pw);
  sc_resample_args a = {0};
  a.src = part;
  a.planes = planes;
  a.src_y = sr[0];
  a.src_x = sc[0];
  a.src_h = ph;
  a.src_w = pw;
  a.in_h = in_h;
  a.in_w = in_w;
  a.out_h = out_h;
  a.out_w = out_w;
  a.box_y = y;
  a.box_x = x;
  a.box_h = h;
  a.box_w = w;
  a.dst = dst;
  a.threads = threads;
  const int rc = sc_resample_u8(&a, err, sizeof err);
  if (rc) fprintf(stderr, "%s\n", err);
  free(part);
  return rc;
}

/* the filter of output j at source pixel k, not normalised */
static double tri_at(int64_t in, int64_t out, int64_t j, int64_t k) {
  const double scale = (double)in / (double)out, fs = scale > 1 ? scale : 1;
  const double c = ((double)j + 0.5) * scale;
  const double t = fabs(((double)k + 0.5 - c) / fs);
  return t < 1 ? 1 - t : 0;
}

/* float64 weights of output j (the filter, untrimmed, normalised) */
static double weight(int64_t in, int64_t out, int64_t j, int64_t k) {
  double sum = 0;
  for (int64_t q = 0; q < in; q++) sum += tri_at(in, out, j, q);
  return tri_at(in, out, j, k) / sum;
}

static void random_case(void) {
  const int64_t planes = rnd_in(1, 3);
  const int64_t in_h = rnd_in(1, 90), in_w = rnd_in(1, 90);
  const int64_t out_h = rnd_in(1, 90), out_w = rnd_in(1, 90);
  uint8_t *src = malloc((size_t)(planes * in_h * in_w));
  const int smooth = (int)(rnd() % 2);
  for (int64_t i = 0; i < planes * in_h * in_w; i++)
    src[i] = smooth ? (uint8_t)(i % in_w * 3 + i / in_w % in_h)
                    : (uint8_t)rnd();
  uint8_t *whole = malloc((size_t)(planes * out_h * out_w));
  CHECK_EQ(resample_box(src, planes, in_h, in_w, out_h, out_w, 0, 0, out_h,
                        out_w, whole, (int)rnd_in(1, 4)),
           SC_OK);
  /* boxes equal the whole's */
  for (int b = 0; b < 6; b++) {
    const int64_t y = rnd_in(0, out_h - 1), x = rnd_in(0, out_w - 1);
    const int64_t h = rnd_in(1, out_h - y), w = rnd_in(1, out_w - x);
    uint8_t *box = malloc((size_t)(planes * h * w));
    CHECK_EQ(resample_box(src, planes, in_h, in_w, out_h, out_w, y, x, h, w,
                          box, (int)rnd_in(1, 3)),
             SC_OK);
    int64_t diff = 0;
    for (int64_t p = 0; p < planes; p++)
      for (int64_t r = 0; r < h; r++)
        for (int64_t c = 0; c < w; c++)
          diff += box[(p * h + r) * w + c] !=
                  whole[(p * out_h + y + r) * out_w + x + c];
    CHECK_EQ(diff, 0);
    free(box);
  }
  /* against float64 (separable, no rounding between the passes), the
   * weights tabulated once per axis */
  if (in_h * in_w <= 2500) {
    double *wr = malloc((size_t)(out_h * in_h) * sizeof *wr);
    double *wc = malloc((size_t)(out_w * in_w) * sizeof *wc);
    for (int64_t i = 0; i < out_h; i++)
      for (int64_t r = 0; r < in_h; r++) wr[i * in_h + r] = weight(in_h, out_h, i, r);
    for (int64_t j = 0; j < out_w; j++)
      for (int64_t c = 0; c < in_w; c++) wc[j * in_w + c] = weight(in_w, out_w, j, c);
    int64_t worst = 0;
    for (int64_t i = 0; i < out_h; i++)
      for (int64_t j = 0; j < out_w; j++) {
        double v = 0;
        for (int64_t r = 0; r < in_h; r++) {
          if (wr[i * in_h + r] == 0) continue;
          for (int64_t c = 0; c < in_w; c++)
            v += wr[i * in_h + r] * wc[j * in_w + c] * src[r * in_w + c];
        }
        const int64_t d = llabs((int64_t)whole[i * out_w + j] - llround(v));
        if (d > worst) worst = d;
      }
    CHECK(worst <= 1);
    free(wr);
    free(wc);
  }
  free(src);
  free(whole);
}

static void constant_and_copy(void) {
  const int64_t sizes[][4] = {{37, 53, 11, 7}, {8, 8, 31, 29}, {100, 3, 1, 1},
                              {5, 64, 5, 64}, {1, 1, 17, 9}};
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    const int64_t ih = sizes[k][0], iw = sizes[k][1], oh = sizes[k][2],
                  ow = sizes[k][3];
    uint8_t *src = malloc((size_t)(ih * iw)), *dst = malloc((size_t)(oh * ow));
    for (int v = 0; v < 256; v += 51) {
      memset(src, v, (size_t)(ih * iw));
      CHECK_EQ(resample_box(src, 1, ih, iw, oh, ow, 0, 0, oh, ow, dst, 2), SC_OK);
      int64_t off = 0;
      for (int64_t i = 0; i < oh * ow; i++) off += dst[i] != v;
      CHECK_EQ(off, 0);
    }
    if (ih == oh && iw == ow) {
      for (int64_t i = 0; i < ih * iw; i++) src[i] = (uint8_t)rnd();
      CHECK_EQ(resample_box(src, 1, ih, iw, oh, ow, 0, 0, oh, ow, dst, 1), SC_OK);
      CHECK(memcmp(src, dst, (size_t)(ih * iw)) == 0);
    }
    free(src);
    free(dst);
  }
}

static void spans_exact(void) {
  char err[256];
  for (int k = 0; k < 300; k++) {
    const int64_t in = rnd_in(1, 400), out = rnd_in(1, 400);
    const int64_t lo = rnd_in(0, out - 1), hi = rnd_in(lo + 1, out);
    int64_t s[2];
    CHECK_EQ(sc_resample_span(in, out, lo, hi, s, err, sizeof err), SC_OK);
    CHECK(0 <= s[0] && s[0] < s[1] && s[1] <= in);
    /* the exact support: the first and last source index with a weight */
    int64_t a = in, b = 0;
    for (int64_t j = lo; j < hi; j++)
      for (int64_t q = 0; q < in; q++)
        if (tri_at(in, out, j, q) > 0) {
          if (q < a) a = q;
          if (q + 1 > b) b = q + 1;
        }
    CHECK(s[0] <= a && b <= s[1]);
    CHECK(s[1] - s[0] <= b - a + 1); /* a zero-rounded end weight at most */
  }
  /* a source part one pixel short of the span is refused, naming both */
  uint8_t src[64 * 64], dst[64 * 64];
  for (int64_t i = 0; i < 64 * 64; i++) src[i] = (uint8_t)i;
  int64_t sr[2];
  CHECK_EQ(sc_resample_span(64, 20, 5, 9, sr, err, sizeof err), SC_OK);
  sc_resample_args a = {0};
  a.src = src;
  a.planes = 1;
  a.src_y = sr[0] + 1;
  a.src_h = sr[1] - sr[0] - 1;
  a.src_w = 64;
  a.in_h = a.in_w = 64;
  a.out_h = a.out_w = 20;
  a.box_y = 5;
  a.box_h = 4;
  a.box_w = 20;
  a.dst = dst;
  err[0] = 0;
  CHECK_EQ(sc_resample_u8(&a, err, sizeof err), SC_ERR);
  CHECK(strstr(err, "source box holds rows") != NULL);
  a.src_y = sr[0];
  a.src_h = sr[1] - sr[0];
  CHECK_EQ(sc_resample_u8(&a, err, sizeof err), SC_OK);
}

static void bad_arguments(void) {
  char err[256];
  uint8_t px[16];
  int64_t s[2];
  const struct {
    int64_t in, out, lo, hi;
  } spans[] = {{0, 4, 0, 1}, {4, 0, 0, 1}, {4, 4, 2, 2}, {4, 4, -1, 2},
               {4, 4, 0, 5}, {(1LL << 31) + 1, 4, 0, 1}, {4, 4, 3, 1}};
  for (size_t k = 0; k < sizeof spans / sizeof spans[0]; k++) {
    err[0] = 0;
    CHECK_EQ(sc_resample_span(spans[k].in, spans[k].out, spans[k].lo,
                              spans[k].hi, s, err, sizeof err),
             SC_ERR);
    CHECK(strstr(err, "streamcnn: resample") != NULL);
  }
  CHECK_EQ(sc_resample_span(4, 4, 0, 1, NULL, err, sizeof err), SC_ERR);
  CHECK_EQ(sc_resample_u8(NULL, err, sizeof err), SC_ERR);
  sc_resample_args good = {0};
  good.src = px;
  good.planes = 1;
  good.src_h = good.src_w = good.in_h = good.in_w = 4;
  good.out_h = good.out_w = good.box_h = good.box_w = 2;
  good.dst = px + 8;
  good.threads = 1;
  CHECK_EQ(sc_resample_u8(&good, err, sizeof err), SC_OK);
  for (int k = 0; k < 9; k++) {
    sc_resample_args a = good;
    switch (k) {
      case 0: a.src = NULL; break;
      case 1: a.dst = NULL; break;
      case 2: a.planes = 0; break;
      case 3: a.src_x = 1; break;            /* part leaves the source */
      case 4: a.box_y = 1; break;            /* box leaves the result */
      case 5: a.box_w = 0; break;
      case 6: a.in_h = -3; break;
      case 7: a.src_h = 0; break;
      case 8: a.planes = 1LL << 40; break;
    }
    err[0] = 0;
    CHECK_EQ(sc_resample_u8(&a, err, sizeof err), SC_ERR);
    CHECK(strstr(err, "streamcnn: resample") != NULL);
  }
}

int main(void) {
  for (int k = 0; k < 400; k++) random_case();
  constant_and_copy();
  spans_exact();
  bad_arguments();
  if (g_failures) fprintf(stderr, "%d failures\n", g_failures);
  return g_failures != 0;
}
