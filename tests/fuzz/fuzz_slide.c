/*
 * fuzz_slide.c — libFuzzer target: the slide reader on mutated TIFF files,
 * through sc_slide_open / sc_slide_read (OpenSlide and libtiff underneath).
 *
 * The input is written to a file of this process (OpenSlide opens paths;
 * removed after each input), opened, and, when it opens, its metadata and
 * a few small regions of every level (corner, far corner, one straddling
 * the right/bottom border, and two slim ones of CHUNK + SLIM pixels, a
 * wide and a tall, that span two of the reader's chunks) are read with 1
 * and 3 threads; both reads must agree or both fail. A failing open or
 * read must give a message. Of every region read, two parts
 * (sc_slide_read_box; one across the last chunk boundary, one anywhere,
 * placed by a hash of the input) are read with 1 and 3 threads and must
 * equal the same crop of the whole region read, bit for bit; a part not
 * inside the region is refused with a message. Regions are at most 96 x 96
 * or slim: the reader's own allocation is 3 * w * h bytes by the caller.
 * Crashes inside OpenSlide / libtiff / libjpeg are theirs (reported in
 * bench/RESULTS.md, not fixed here).
 */
#define _POSIX_C_SOURCE 200809L
#include "fuzz_common.h"
#include "slide.h"

#include <unistd.h>

#define EDGE 96
#define CHUNK 512 /* the reader's chunk edge (slide.h) */
#define SLIM 24   /* the short side of the two-chunk regions */
#define MAX_PIX (EDGE * EDGE > (CHUNK + SLIM) * SLIM ? EDGE * EDGE \
                                                     : (CHUNK + SLIM) * SLIM)
#define PART_EDGE 48

static char g_path[64];
static uint64_t g_rng; /* the parts' places: a hash of the input */

static uint64_t rnd(void) { /* xorshift64 */
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return g_rng;
}

/* Parts of the region (x, y) + w x h of `level`, read with 1 and 3
 * threads, against the whole region's planar read `whole`. */
static void read_parts(sc_slide *s, int32_t level, int64_t x, int64_t y,
                       int64_t w, int64_t h, const uint8_t *whole) {
  static uint8_t p1[3 * PART_EDGE * PART_EDGE], p3[3 * PART_EDGE * PART_EDGE];
  char err[512];
  for (int k = 0; k < 2; k++) {
    int64_t bx, by;
    if (k == 0) { /* just before the last chunk boundary (or at 0) */
      const int64_t cx = (w - 1) / CHUNK * CHUNK, cy = (h - 1) / CHUNK * CHUNK;
      bx = cx - 1 - (int64_t)(rnd() % 16);
      by = cy - 1 - (int64_t)(rnd() % 16);
      if (bx < 0) bx = 0;
      if (by < 0) by = 0;
    } else {
      bx = (int64_t)(rnd() % (uint64_t)w);
      by = (int64_t)(rnd() % (uint64_t)h);
    }
    const int64_t mw = w - bx < PART_EDGE ? w - bx : PART_EDGE;
    const int64_t mh = h - by < PART_EDGE ? h - by : PART_EDGE;
    const int64_t bw = (int64_t)(rnd() % (uint64_t)mw) + 1;
    const int64_t bh = (int64_t)(rnd() % (uint64_t)mh) + 1;
    for (int t = 1; t <= 3; t += 2) {
      uint8_t *p = t == 1 ? p1 : p3;
      err[0] = 0;
      const int rc = sc_slide_read_box(s, level, x, y, w, h, bx, by, bw, bh, p,
                                       0, t, err, sizeof err);
      if (rc) fprintf(stderr, "%s\n", err);
      FZ_CHECK(rc == SC_OK); /* the same chunks read before */
      for (int c = 0; c < 3; c++)
        for (int64_t r = 0; r < bh; r++)
          FZ_CHECK(memcmp(p + (c * bh + r) * bw,
                          whole + (c * h + by + r) * w + bx, (size_t)bw) == 0);
    }
  }
  /* a part not inside the region */
  int64_t bx = 0, by = 0, bw = 1, bh = 1;
  const uint64_t v = rnd();
  switch (v % 6) {
    case 0: bx = w - (int64_t)(v >> 8 & 7); bw = 8; break; /* past the right */
    case 1: by = h; break;
    case 2: bx = -1 - (int64_t)(v >> 8 & 0xffff); break;
    case 3: bw = 0; break;
    case 4: bh = h + 1 + (int64_t)(v >> 8 & 0xffff); break;
    default: by = INT64_MAX - (int64_t)(v >> 8 & 7); break;
  }
  err[0] = 0;
  FZ_CHECK(sc_slide_read_box(s, level, x, y, w, h, bx, by, bw, bh, p1, 0, 1,
                             err, sizeof err) == SC_ERR && err[0]);
}

static void read_some(sc_slide *s, int32_t level, int64_t x, int64_t y,
                      int64_t w, int64_t h) {
  static uint8_t a[3 * MAX_PIX], b[3 * MAX_PIX];
  FZ_CHECK(w * h <= MAX_PIX);
  char err[512] = {0}, err2[512] = {0};
  const int ra = sc_slide_read(s, level, x, y, w, h, a, 0, 1, err, sizeof err);
  if (ra) {
    FZ_CHECK(err[0]);
    return; /* OpenSlide's error latches: the handle is unusable now */
  }
  const int rb = sc_slide_read(s, level, x, y, w, h, b, 1, 3, err2,
                               sizeof err2);
  if (rb) {
    FZ_CHECK(err2[0]);
    return;
  }
  /* the planar and the interleaved copies hold the same pixels */
  for (int64_t i = 0; i < w * h; i++)
    for (int c = 0; c < 3; c++) FZ_CHECK(a[c * w * h + i] == b[3 * i + c]);
  read_parts(s, level, x, y, w, h, a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!g_path[0])
    snprintf(g_path, sizeof g_path, "/tmp/sc_fuzz_slide_%ld.tiff",
             (long)getpid());
  FILE *f = fopen(g_path, "wb");
  if (!f) return 0;
  const int ok = fwrite(data, 1, size, f) == size;
  fclose(f);
  if (!ok) return 0;
  g_rng = 1469598103934665603ULL; /* FNV-1a; never 0 after the | 1 */
  for (size_t i = 0; i < size; i++) g_rng = (g_rng ^ data[i]) * 1099511628211ULL;
  g_rng |= 1;
  char err[512] = {0};
  sc_slide *s = sc_slide_open(g_path, err, sizeof err);
  if (!s) {
    unlink(g_path);
    FZ_CHECK(err[0]);
    return 0;
  }
  const int32_t n = sc_slide_level_count(s);
  FZ_CHECK(n >= 1);
  const char *const *names = sc_slide_property_names(s);
  for (int i = 0; names && names[i]; i++) (void)sc_slide_property(s, names[i]);
  uint8_t bg[3];
  sc_slide_background(s, bg);
  for (int32_t l = 0; l < n && l < 4; l++) {
    int64_t w, h;
    double ds;
    FZ_CHECK(sc_slide_level(s, l, &w, &h, &ds) == SC_OK);
    if (w < 1 || h < 1) continue;
    const int sheared = sc_slide_level_sheared(s, l);
    FZ_CHECK(sheared == 0 || sheared == 1);
    if (sheared) { /* a level OpenSlide reads wrong: every read refused */
      static uint8_t px[3];
      err[0] = 0;
      FZ_CHECK(sc_slide_read(s, l, 0, 0, 1, 1, px, 0, 1, err, sizeof err) ==
                   SC_ERR && strstr(err, "smaller than its"));
      continue;
    }
    const int64_t rw = w < EDGE ? w : EDGE, rh = h < EDGE ? h : EDGE;
    read_some(s, l, 0, 0, rw, rh);
    /* the far corner (level-0 coordinates) and past the border */
    const double x0 = (double)(w - rw) * ds, y0 = (double)(h - rh) * ds;
    if (x0 < 1e12 && y0 < 1e12) {
      read_some(s, l, (int64_t)x0, (int64_t)y0, rw, rh);
      read_some(s, l, (int64_t)(x0 + (double)rw / 2 * ds),
                (int64_t)(y0 + (double)rh / 2 * ds), rw, rh);
    }
    /* two chunks: a wide region at the level's origin, a tall one from the
     * middle (both mostly past small levels: background) */
    read_some(s, l, 0, 0, CHUNK + SLIM, SLIM);
    const double xm = (double)(w / 2) * ds, ym = (double)(h / 2) * ds;
    if (xm < 1e12 && ym < 1e12)
      read_some(s, l, (int64_t)xm, (int64_t)ym, SLIM, CHUNK + SLIM);
  }
  /* a bad level and a bad size are refused with a message */
  char e2[256] = {0};
  static uint8_t one[3];
  FZ_CHECK(sc_slide_read(s, n, 0, 0, 1, 1, one, 0, 1, e2, sizeof e2) ==
               SC_ERR && e2[0]);
  FZ_CHECK(sc_slide_level_sheared(s, n) == -1);
  sc_slide_close(s);
  unlink(g_path); /* OpenSlide reopens by path while open: remove it after */
  return 0;
}
