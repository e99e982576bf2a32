/*
 * tiffcheck.c — structural check of a TIFF file before OpenSlide opens it.
 *
 * OpenSlide 3.4 (Debian 12) dies with SIGFPE inside openslide_open on some
 * damaged slides (found by tests/fuzz/fuzz_slide; the input is in
 * tests/fuzz/regress/slide/): an Aperio file whose second level is far
 * larger than its first gets a per-axis downsample that rounds to 0, and
 * OpenSlide divides by it. A pyramid's levels shrink; a tiled directory
 * over twice the size of the first tiled one (or of size 0) is refused.
 * We cannot fix OpenSlide, and a slide reader must not take the process
 * down, so sc_slide_open refuses such files here, with a message, before
 * handing them over. The check reads only directory entries (no pixels).
 *
 * Not a TIFF (MIRAX, Hamamatsu .vms, ...) or a TIFF libtiff cannot open:
 * not our call, OpenSlide decides. Thread-safe: libtiff's per-handle
 * (ExtR) handlers, no global state.
 */
#define _POSIX_C_SOURCE 200809L
#include "io_internal.h"

#ifdef SC_WITH_OPENSLIDE

#include <stdarg.h>
#include <stdio.h>
#include <tiffio.h>

#define MAX_DIRS 65536 /* libtiff stops IFD loops itself; a cap regardless */

static int quiet(TIFF *tif, void *user, const char *module, const char *fmt,
                 va_list ap) {
  (void)tif, (void)user, (void)module, (void)fmt, (void)ap;
  return 1; /* handled: keep libtiff's global handlers (stderr) out of it */
}

int _sc_tiff_precheck(const char *path, char *err, size_t errlen) {
  TIFFOpenOptions *opts = TIFFOpenOptionsAlloc();
  if (!opts) return _sc_slide_fail(err, errlen, "streamcnn: out of memory");
  TIFFOpenOptionsSetErrorHandlerExtR(opts, quiet, NULL);
  TIFFOpenOptionsSetWarningHandlerExtR(opts, quiet, NULL);
  TIFF *tif = TIFFOpenExt(path, "r", opts);
  TIFFOpenOptionsFree(opts);
  if (!tif) return SC_OK; /* not a TIFF libtiff reads: OpenSlide decides */
  int rc = SC_OK, dir = 0;
  uint32_t w0 = 0, h0 = 0; /* the first tiled directory: level 0 */
  do {
    if (!TIFFIsTiled(tif)) continue;
    uint32_t w = 0, h = 0, tw = 0, th = 0;
    TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &w);
    TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &h);
    TIFFGetField(tif, TIFFTAG_TILEWIDTH, &tw);
    TIFFGetField(tif, TIFFTAG_TILELENGTH, &th);
    if (tw == 0 || th == 0 || w == 0 || h == 0) {
      rc = _sc_slide_fail(err, errlen,
                          "streamcnn: '%s' is a damaged TIFF: directory %d "
                          "is %ux%u, tiled %ux%u",
                          path, dir, (unsigned)w, (unsigned)h, (unsigned)tw,
                          (unsigned)th);
      break;
    }
    if (!w0) {
      w0 = w, h0 = h;
    } else if ((uint64_t)w > 2 * (uint64_t)w0 || (uint64_t)h > 2 * (uint64_t)h0) {
      rc = _sc_slide_fail(
          err, errlen,
          "streamcnn: '%s' is a damaged slide: tiled directory %d (%ux%u) is "
          "over twice the size of the first one (%ux%u), a pyramid's levels "
          "shrink (refused before OpenSlide, which can crash on it)",
          path, dir, (unsigned)w, (unsigned)h, (unsigned)w0, (unsigned)h0);
      break;
    }
  } while (++dir < MAX_DIRS && TIFFReadDirectory(tif));
  TIFFClose(tif);
  return rc;
}

#endif /* SC_WITH_OPENSLIDE */
