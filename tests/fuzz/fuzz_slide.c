/*
 * fuzz_slide.c — libFuzzer target: the slide reader on mutated TIFF files,
 * through sc_slide_open / sc_slide_read (OpenSlide and libtiff underneath).
 *
 * The input is written to a file of this process (OpenSlide opens paths;
 * removed after each input), opened, and, when it opens, its metadata and
 * a few small regions of every level (corner, far corner, and one straddling the right/bottom
 * border) are read with 1 and 3 threads; both reads must agree or both
 * fail. A failing open or read must give a message. Regions are at most
 * 96 x 96: the reader's own allocation is 3 * w * h bytes by the caller.
 * Crashes inside OpenSlide / libtiff / libjpeg are theirs (reported in
 * bench/RESULTS.md, not fixed here).
 */
#define _POSIX_C_SOURCE 200809L
#include "fuzz_common.h"
#include "slide.h"

#include <unistd.h>

#define EDGE 96

static char g_path[64];

static void read_some(sc_slide *s, int32_t level, int64_t x, int64_t y,
                      int64_t w, int64_t h) {
  static uint8_t a[3 * EDGE * EDGE], b[3 * EDGE * EDGE];
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
    const int64_t rw = w < EDGE ? w : EDGE, rh = h < EDGE ? h : EDGE;
    read_some(s, l, 0, 0, rw, rh);
    /* the far corner (level-0 coordinates) and past the border */
    const double x0 = (double)(w - rw) * ds, y0 = (double)(h - rh) * ds;
    if (x0 < 1e12 && y0 < 1e12) {
      read_some(s, l, (int64_t)x0, (int64_t)y0, rw, rh);
      read_some(s, l, (int64_t)(x0 + (double)rw / 2 * ds),
                (int64_t)(y0 + (double)rh / 2 * ds), rw, rh);
    }
  }
  /* a bad level and a bad size are refused with a message */
  char e2[256] = {0};
  static uint8_t one[3];
  FZ_CHECK(sc_slide_read(s, n, 0, 0, 1, 1, one, 0, 1, e2, sizeof e2) ==
               SC_ERR && e2[0]);
  sc_slide_close(s);
  unlink(g_path); /* OpenSlide reopens by path while open: remove it after */
  return 0;
}
