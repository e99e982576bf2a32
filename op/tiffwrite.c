/*
 * tiffwrite.c — pyramidal tiled TIFF writer for synthetic slides (see
 * slide.h), on libtiff. Tiles are staged in one tile-sized buffer; the
 * caller's level images are only read.
 */
#include "slide.h"
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SC_WITH_OPENSLIDE /* built without OpenSlide: no libtiff either */

int sc_tiff_write_pyramid(const char *path, int n_levels,
                          const uint8_t *const *levels, const int64_t *widths,
                          const int64_t *heights, int tile, int compression,
                          int quality, const char *description, char *err,
                          size_t errlen) {
  (void)path, (void)n_levels, (void)levels, (void)widths, (void)heights;
  (void)tile, (void)compression, (void)quality, (void)description;
  return _sc_slide_fail(err, errlen,
                 "streamcnn was built without OpenSlide/libtiff "
                 "(STREAMCNN_OPENSLIDE=OFF): cannot write slides");
}

int sc_tiff_write_striped(const char *path, const uint8_t *rgb, int64_t w,
                          int64_t h, char *err, size_t errlen) {
  (void)path, (void)rgb, (void)w, (void)h;
  return _sc_slide_fail(err, errlen,
                 "streamcnn was built without OpenSlide/libtiff "
                 "(STREAMCNN_OPENSLIDE=OFF): cannot write TIFFs");
}

#else

#include <tiffio.h>

/* libtiff reports through handlers; keep them quiet, we check return codes. */
static void tiff_silent(const char *module, const char *fmt, va_list ap) {
  (void)module, (void)fmt, (void)ap;
}

static int set_rgb_tags(TIFF *t, int64_t w, int64_t h, int compression,
                        int quality) {
  int ok = TIFFSetField(t, TIFFTAG_IMAGEWIDTH, (uint32_t)w) &&
           TIFFSetField(t, TIFFTAG_IMAGELENGTH, (uint32_t)h) &&
           TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, 8) &&
           TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, 3) &&
           TIFFSetField(t, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG) &&
           TIFFSetField(t, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_RGB);
  if (ok && compression == 1)
    ok = TIFFSetField(t, TIFFTAG_COMPRESSION, COMPRESSION_ADOBE_DEFLATE);
  else if (ok && compression == 2)
    ok = TIFFSetField(t, TIFFTAG_COMPRESSION, COMPRESSION_JPEG) &&
         TIFFSetField(t, TIFFTAG_JPEGQUALITY, quality);
  else if (ok)
    ok = TIFFSetField(t, TIFFTAG_COMPRESSION, COMPRESSION_NONE);
  return ok;
}

int sc_tiff_write_pyramid(const char *path, int n_levels,
                          const uint8_t *const *levels, const int64_t *widths,
                          const int64_t *heights, int tile, int compression,
                          int quality, const char *description, char *err,
                          size_t errlen) {
  if (!path || n_levels < 1 || n_levels > 32 || !levels || !widths || !heights)
    return _sc_slide_fail(err, errlen, "streamcnn: bad pyramid arguments");
  if (tile < 16 || tile > 4096 || tile % 16)
    return _sc_slide_fail(err, errlen,
                   "streamcnn: tile %d must be a multiple of 16 in [16, 4096]",
                   tile);
  if (compression < 0 || compression > 2 ||
      (compression == 2 && (quality < 1 || quality > 100)))
    return _sc_slide_fail(err, errlen, "streamcnn: bad compression %d / quality %d",
                   compression, quality);
  double bytes = 0;
  for (int l = 0; l < n_levels; l++) {
    if (!levels[l] || widths[l] < 1 || heights[l] < 1 ||
        widths[l] > 0xFFFFFFFFLL || heights[l] > 0xFFFFFFFFLL)
      return _sc_slide_fail(err, errlen, "streamcnn: bad level %d (%lld x %lld)", l,
                     (long long)widths[l], (long long)heights[l]);
    bytes += 3.0 * (double)widths[l] * (double)heights[l];
  }
  TIFFSetErrorHandler(tiff_silent);
  TIFFSetWarningHandler(tiff_silent);
  TIFF *t = TIFFOpen(path, bytes > 2e9 ? "w8" : "w");
  if (!t) return _sc_slide_fail(err, errlen, "streamcnn: cannot create '%s'", path);
  uint8_t *buf = malloc((size_t)tile * tile * 3);
  int rc = SC_ERR;
  if (!buf) {
    _sc_slide_fail(err, errlen, "streamcnn: out of memory writing '%s'", path);
    goto done;
  }
  for (int l = 0; l < n_levels; l++) {
    const int64_t w = widths[l], h = heights[l];
    /* OpenSlide 3.4.1 (with libtiff 4.5) misreads a level narrower or
     * shorter than one tile: such levels get the largest tile edge (a
     * multiple of 16) that fits, when there is one */
    const int64_t fit = (w < h ? w : h) / 16 * 16;
    const int tile_l = fit >= tile ? tile : fit >= 16 ? (int)fit : 16;
    if (!set_rgb_tags(t, w, h, compression, quality) ||
        !TIFFSetField(t, TIFFTAG_TILEWIDTH, (uint32_t)tile_l) ||
        !TIFFSetField(t, TIFFTAG_TILELENGTH, (uint32_t)tile_l) ||
        !TIFFSetField(t, TIFFTAG_SUBFILETYPE, l ? FILETYPE_REDUCEDIMAGE : 0) ||
        (l == 0 && description &&
         !TIFFSetField(t, TIFFTAG_IMAGEDESCRIPTION, description))) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot set the tags of level %d of '%s'",
              l, path);
      goto done;
    }
    for (int64_t ty = 0; ty < h; ty += tile_l)
      for (int64_t tx = 0; tx < w; tx += tile_l) {
        memset(buf, 255, (size_t)tile_l * tile_l * 3); /* edge tiles: white */
        const int64_t cw = w - tx < tile_l ? w - tx : tile_l;
        const int64_t ch = h - ty < tile_l ? h - ty : tile_l;
        for (int64_t r = 0; r < ch; r++)
          memcpy(buf + (size_t)r * tile_l * 3, levels[l] + ((ty + r) * w + tx) * 3,
                 (size_t)cw * 3);
        if (TIFFWriteTile(t, buf, (uint32_t)tx, (uint32_t)ty, 0, 0) < 0) {
          _sc_slide_fail(err, errlen, "streamcnn: cannot write a tile of '%s' (disk "
                               "full?)",
                  path);
          goto done;
        }
      }
    if (!TIFFWriteDirectory(t)) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot write level %d of '%s'", l, path);
      goto done;
    }
  }
  rc = SC_OK;
done:
  free(buf);
  TIFFClose(t);
  return rc;
}

int sc_tiff_write_striped(const char *path, const uint8_t *rgb, int64_t w,
                          int64_t h, char *err, size_t errlen) {
  if (!path || !rgb || w < 1 || h < 1 || w > 65535 || h > 65535)
    return _sc_slide_fail(err, errlen, "streamcnn: bad striped TIFF arguments");
  TIFFSetErrorHandler(tiff_silent);
  TIFFSetWarningHandler(tiff_silent);
  TIFF *t = TIFFOpen(path, "w");
  if (!t) return _sc_slide_fail(err, errlen, "streamcnn: cannot create '%s'", path);
  int rc = SC_ERR;
  if (!set_rgb_tags(t, w, h, 1, 0) ||
      !TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, 16)) {
    _sc_slide_fail(err, errlen, "streamcnn: cannot set the tags of '%s'", path);
    goto done;
  }
  for (int64_t r = 0; r < h; r++)
    if (TIFFWriteScanline(t, (void *)(rgb + r * w * 3), (uint32_t)r, 0) < 0) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot write '%s'", path);
      goto done;
    }
  rc = SC_OK;
done:
  TIFFClose(t);
  return rc;
}

#endif
