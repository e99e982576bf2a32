/*
 * fuzz_resample.c — libFuzzer target: the fixed-point resampler
 * (sc_resample_span, sc_resample_u8; io/resample.c), needing no OpenSlide.
 *
 * Input (little-endian), a 28-byte header (a shorter input is padded with
 * zeros) and pixels:
 *    0 u8   planes       % 3 + 1
 *    1 u8   mode         bits 0-1: 1 = many row taps (in_h 1 .. 4096,
 *                        out_h 1 .. 8), 2 = many column taps (the same for
 *                        the columns), 0 or 3 = both axes small
 *    2 u16  in_h, 4 u16 in_w, 6 u16 out_h, 8 u16 out_w
 *                        taken modulo: small axes 1 .. 96 (1 .. 16 beside
 *                        a long one)
 *   10 u16  box_y, 12 u16 box_x    % out_h, % out_w
 *   14 u16  box_h, 16 u16 box_w    % (out - box offset) + 1
 *   18 u8   threads      % 3 + 1
 *   19 u8   bad          which bad argument set (% N_BAD, see bad_args)
 *   20 u64  value        the bad value's seed
 *   28 ...  pixel bytes, cycled to fill planes x in_h x in_w; none: a
 *           pattern
 * Invariants:
 *   - the whole resample succeeds; equal sizes copy the source;
 *   - sc_resample_span of the box's rows and of its columns is non-empty
 *     and inside [0, in);
 *   - the box resampled from only the source part the spans name (with
 *     another thread count), and from the whole source, equals the crop of
 *     the whole resample bit for bit;
 *   - a source part one pixel short of the spans on any side (a one-pixel
 *     span becomes empty) is refused: SC_ERR and "streamcnn: resample";
 *   - a source holding a fill value outside a part of it resamples, from
 *     the part and the fill (sc_resample_args.fill), as from the whole;
 *   - a constant image (every byte the first) resamples to that constant;
 *   - one bad argument set (box outside the output, planes out of
 *     [1, 4096], sizes <= 0 or > 2^31, a source part outside the source,
 *     NULL buffers, bad span queries; values near 0, near 2^31, near
 *     INT64_MIN / INT64_MAX or random) is refused with SC_ERR and a message.
 * Memory and time stay small: at most 3 x 96 x 96 or 3 x 4096 x 16 source
 * bytes (the comparisons libFuzzer traces in the inner loops make a long
 * axis beside a 96-pixel one cost ~0.5 s an input), 3 x 96 x 96 out.
 */
#include "fuzz_common.h"
#include "slide.h"

#define HEADER 28
#define SMALL 96      /* a small axis: extents 1 .. SMALL */
#define LONG_IN 4096  /* a long axis: in 1 .. LONG_IN, out 1 .. LONG_OUT */
#define LONG_OUT 8
#define BESIDE 16     /* a small axis beside a long one: 1 .. BESIDE */
#define N_BAD 12
#define EDGE_MAX (1LL << 31)

static uint16_t fz_u16(const uint8_t *p) {
  return (uint16_t)(p[0] | p[1] << 8);
}

static uint64_t fz_u64(const uint8_t *p) {
  return (uint64_t)fz_u32(p) | (uint64_t)fz_u32(p + 4) << 32;
}

/* A value >= lo (lo >= 0): near lo, near 2^31 + lo, near INT64_MAX, or
 * anywhere up to INT64_MAX (v's low two bits choose). */
static int64_t at_least(int64_t lo, uint64_t v) {
  const uint64_t r = v >> 2, room = (uint64_t)(INT64_MAX - lo);
  switch (v & 3) {
    case 0: return lo + (int64_t)(r % 8 < room ? r % 8 : room);
    case 1: return lo + (int64_t)(r % (room + 1));
    case 2: return INT64_MAX - (int64_t)(r % 8 < room ? r % 8 : room);
    default: return lo + (int64_t)((EDGE_MAX + r % 8) < room ? EDGE_MAX + r % 8
                                                              : room);
  }
}

/* A value < 0: near -1, near -2^31, near INT64_MIN or anywhere. */
static int64_t negative(uint64_t v) {
  const uint64_t r = v >> 2;
  switch (v & 3) {
    case 0: return -1 - (int64_t)(r % 8);
    case 1: return -1 - (int64_t)(r >> 1);
    case 2: return INT64_MIN + (int64_t)(r % 8);
    default: return -EDGE_MAX - 4 + (int64_t)(r % 8);
  }
}

/* A size no resample takes: <= 0 or > 2^31. */
static int64_t bad_size(uint64_t v) {
  switch (v % 3) {
    case 0: return 0;
    case 1: return negative(v / 3);
    default: return at_least(EDGE_MAX + 1, v / 3);
  }
}

/* planes x h x w of src (planes x sh x sw) at (y, x) into dst */
static void crop(const uint8_t *src, int64_t planes, int64_t sh, int64_t sw,
                 int64_t y, int64_t x, int64_t h, int64_t w, uint8_t *dst) {
  for (int64_t p = 0; p < planes; p++)
    for (int64_t r = 0; r < h; r++)
      memcpy(dst + (p * h + r) * w, src + (p * sh + y + r) * sw + x,
             (size_t)w);
}

static int refused(int rc, const char *err) {
  return rc == SC_ERR && strstr(err, "streamcnn: resample") != NULL;
}

/* One bad argument set derived from `good` (a valid call) and (sel, v):
 * must be refused with a message, and must not touch the buffers. */
static void bad_args(const sc_resample_args *good, int sel, uint64_t v) {
  sc_resample_args a = *good;
  char err[512] = {0};
  const uint64_t w = v >> 2; /* v's two low bits pick the variant */
  switch (sel) {
    case 0: a.box_y = at_least(a.out_h - a.box_h + 1, v); break;
    case 1: a.box_x = at_least(a.out_w - a.box_w + 1, v); break;
    case 2: if (v & 1) a.box_y = negative(w); else a.box_x = negative(w);
            break;
    case 3: if (v & 1) a.box_h = w & 1 ? 0 : negative(w >> 1);
            else a.box_w = w & 1 ? 0 : negative(w >> 1);
            break;
    case 4: if (v & 1) a.box_h = at_least(a.out_h - a.box_y + 1, w);
            else a.box_w = at_least(a.out_w - a.box_x + 1, w);
            break;
    case 5: a.planes = w % 3 == 0 ? 0 : w % 3 == 1 ? negative(w / 3)
                                                   : at_least(4097, w / 3);
            break;
    case 6: if (v & 1) a.in_h = bad_size(w); else a.in_w = bad_size(w);
            break;
    case 7: if (v & 1) a.out_h = bad_size(w); else a.out_w = bad_size(w);
            break;
    case 8: /* the source part leaves the source */
      switch (v & 3) {
        case 0: a.src_y = negative(w); break;
        case 1: a.src_x = at_least(a.in_w - a.src_w + 1, w); break;
        case 2: a.src_h = at_least(a.in_h - a.src_y + 1, w); break;
        default: a.src_w = w & 1 ? 0 : negative(w >> 1); break;
      }
      break;
    case 9: if (v & 1) a.src = NULL; else a.dst = NULL; break;
    case 10: /* everything at once, as a careless caller might */
      a.in_h = bad_size(w);
      a.box_y = negative(w >> 8);
      a.planes = 0;
      break;
    default: { /* the span query */
      int64_t s[2], in = good->in_h, out = good->out_h, lo = good->box_y,
                    hi = good->box_y + good->box_h;
      switch (v % 5) {
        case 0: in = bad_size(w); break;
        case 1: out = bad_size(w); break;
        case 2: lo = w & 1 ? negative(w >> 1) : hi; break;
        case 3: hi = at_least(out + 1, w); break;
        default: {
          FZ_CHECK(refused(sc_resample_span(in, out, lo, hi, NULL, err,
                                            sizeof err), err));
          return;
        }
      }
      FZ_CHECK(refused(sc_resample_span(in, out, lo, hi, s, err, sizeof err),
                       err));
      return;
    }
  }
  FZ_CHECK(refused(sc_resample_u8(&a, err, sizeof err), err));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t hd[HEADER] = {0};
  memcpy(hd, data, size < HEADER ? size : HEADER);
  const uint8_t *pix = data + (size < HEADER ? size : HEADER);
  const size_t n_pix = size > HEADER ? size - HEADER : 0;
  const int64_t planes = hd[0] % 3 + 1;
  const int mode = hd[1] & 3;
  const int64_t sm = mode == 1 || mode == 2 ? BESIDE : SMALL;
  const int64_t in_h = fz_u16(hd + 2) % (mode == 1 ? LONG_IN : sm) + 1;
  const int64_t in_w = fz_u16(hd + 4) % (mode == 2 ? LONG_IN : sm) + 1;
  const int64_t out_h = fz_u16(hd + 6) % (mode == 1 ? LONG_OUT : sm) + 1;
  const int64_t out_w = fz_u16(hd + 8) % (mode == 2 ? LONG_OUT : sm) + 1;
  const int64_t by = fz_u16(hd + 10) % out_h, bx = fz_u16(hd + 12) % out_w;
  const int64_t bh = fz_u16(hd + 14) % (out_h - by) + 1;
  const int64_t bw = fz_u16(hd + 16) % (out_w - bx) + 1;
  const int threads = hd[18] % 3 + 1;
  const int sel = hd[19] % N_BAD;
  const uint64_t value = fz_u64(hd + 20);

  const int64_t n_src = planes * in_h * in_w, n_out = planes * out_h * out_w;
  uint8_t *src = malloc((size_t)n_src), *whole = malloc((size_t)n_out);
  uint8_t *box = malloc((size_t)(planes * bh * bw));
  uint8_t *want = malloc((size_t)(planes * bh * bw));
  FZ_CHECK(src && whole && box && want);
  for (int64_t i = 0; i < n_src; i++)
    src[i] = n_pix ? pix[(size_t)i % n_pix]
                   : (uint8_t)(i % in_w * 5 + i / in_w * 3 + (i * i >> 7));
  char err[512] = {0};

  /* the whole resample */
  sc_resample_args a = {0};
  a.src = src;
  a.planes = planes;
  a.src_h = a.in_h = in_h;
  a.src_w = a.in_w = in_w;
  a.out_h = a.box_h = out_h;
  a.out_w = a.box_w = out_w;
  a.dst = whole;
  a.threads = threads;
  FZ_CHECK(sc_resample_u8(&a, err, sizeof err) == SC_OK);
  if (in_h == out_h && in_w == out_w)
    FZ_CHECK(memcmp(src, whole, (size_t)n_src) == 0);
  crop(whole, planes, out_h, out_w, by, bx, bh, bw, want);

  /* the spans of the box */
  int64_t sr[2] = {-1, -1}, sc[2] = {-1, -1};
  FZ_CHECK(sc_resample_span(in_h, out_h, by, by + bh, sr, err, sizeof err) ==
           SC_OK);
  FZ_CHECK(sc_resample_span(in_w, out_w, bx, bx + bw, sc, err, sizeof err) ==
           SC_OK);
  FZ_CHECK(0 <= sr[0] && sr[0] < sr[1] && sr[1] <= in_h);
  FZ_CHECK(0 <= sc[0] && sc[0] < sc[1] && sc[1] <= in_w);

  /* the box from only the part the spans name, with another thread count */
  const int64_t ph = sr[1] - sr[0], pw = sc[1] - sc[0];
  uint8_t *part = malloc((size_t)(planes * ph * pw));
  FZ_CHECK(part);
  crop(src, planes, in_h, in_w, sr[0], sc[0], ph, pw, part);
  sc_resample_args b = a;
  b.src = part;
  b.src_y = sr[0];
  b.src_x = sc[0];
  b.src_h = ph;
  b.src_w = pw;
  b.box_y = by;
  b.box_x = bx;
  b.box_h = bh;
  b.box_w = bw;
  b.dst = box;
  b.threads = threads % 3 + 1;
  FZ_CHECK(sc_resample_u8(&b, err, sizeof err) == SC_OK);
  FZ_CHECK(memcmp(box, want, (size_t)(planes * bh * bw)) == 0);

  /* the box from the whole source (a part larger than needed) */
  sc_resample_args c = a;
  c.box_y = by;
  c.box_x = bx;
  c.box_h = bh;
  c.box_w = bw;
  c.dst = box;
  memset(box, 0, (size_t)(planes * bh * bw));
  FZ_CHECK(sc_resample_u8(&c, err, sizeof err) == SC_OK);
  FZ_CHECK(memcmp(box, want, (size_t)(planes * bh * bw)) == 0);

  /* a part one pixel short on any side is refused (the shorter part lies
   * in the same buffer: were it accepted, ASan would see the reads) */
  for (int side = 0; side < 4; side++) {
    sc_resample_args s = b;
    switch (side) {
      case 0: s.src_y++; s.src_h--; break;
      case 1: s.src_h--; break;
      case 2: s.src_x++; s.src_w--; break;
      default: s.src_w--; break;
    }
    err[0] = 0;
    FZ_CHECK(refused(sc_resample_u8(&s, err, sizeof err), err));
  }

  /* with a fill: a source holding the fill outside a part of it (placed
   * by the bad value's high bits) resamples, from the part alone and the
   * fill, bit for bit as from the whole (the part need not hold the
   * spans; it may miss the box's altogether) */
  {
    const uint64_t v = value >> 17;
    const int64_t fy = (int64_t)(v % (uint64_t)in_h);
    const int64_t fx = (int64_t)(v / 4099 % (uint64_t)in_w);
    const int64_t fh = (int64_t)(v / 77 % (uint64_t)(in_h - fy)) + 1;
    const int64_t fw = (int64_t)(v / 1031 % (uint64_t)(in_w - fx)) + 1;
    uint8_t fill[3];
    for (int64_t p = 0; p < 3; p++) fill[p] = (uint8_t)(hd[19] * 37 + p * 101);
    for (int64_t p = 0; p < planes; p++)
      for (int64_t r = 0; r < in_h; r++)
        for (int64_t q = 0; q < in_w; q++)
          if (r < fy || r >= fy + fh || q < fx || q >= fx + fw)
            src[(p * in_h + r) * in_w + q] = fill[p];
    FZ_CHECK(sc_resample_u8(&c, err, sizeof err) == SC_OK); /* the whole */
    memcpy(want, box, (size_t)(planes * bh * bw));
    uint8_t *held = malloc((size_t)(planes * fh * fw));
    FZ_CHECK(held);
    crop(src, planes, in_h, in_w, fy, fx, fh, fw, held);
    sc_resample_args f = c;
    f.src = held;
    f.src_y = fy;
    f.src_x = fx;
    f.src_h = fh;
    f.src_w = fw;
    f.fill = fill;
    f.threads = threads % 3 + 1;
    memset(box, 0, (size_t)(planes * bh * bw));
    FZ_CHECK(sc_resample_u8(&f, err, sizeof err) == SC_OK);
    FZ_CHECK(memcmp(box, want, (size_t)(planes * bh * bw)) == 0);
    free(held);
  }

  /* one bad argument set */
  bad_args(&b, sel, value);

  /* a constant image stays constant */
  const uint8_t k = src[0];
  memset(src, k, (size_t)n_src);
  FZ_CHECK(sc_resample_u8(&a, err, sizeof err) == SC_OK);
  for (int64_t i = 0; i < n_out; i++) FZ_CHECK(whole[i] == k);

  free(part);
  free(want);
  free(box);
  free(whole);
  free(src);
  return 0;
}
