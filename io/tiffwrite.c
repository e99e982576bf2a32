/*
 * tiffwrite.c — pyramidal tiled TIFF writers (see slide.h), on libtiff:
 * sc_tiff_write_pyramid for synthetic slides (whole levels in memory, only
 * read), sc_tiff_stream_* for maps too large to hold (rows in order, reduced
 * levels built on the way). Tiles are staged in one tile-sized buffer.
 */
#include "io_internal.h"

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

struct sc_tiff_stream {
  int unused;
};

sc_tiff_stream *sc_tiff_stream_open(const char *path, int64_t width,
                                    int64_t height, int n_levels, int tile,
                                    int compression, double mpp,
                                    const char *description, char *err,
                                    size_t errlen) {
  (void)path, (void)width, (void)height, (void)n_levels, (void)tile;
  (void)compression, (void)mpp, (void)description;
  _sc_slide_fail(err, errlen,
                 "streamcnn was built without OpenSlide/libtiff "
                 "(STREAMCNN_OPENSLIDE=OFF): cannot write TIFFs");
  return NULL;
}

int sc_tiff_stream_write(sc_tiff_stream *s, const uint8_t *rows,
                         int64_t n_rows, char *err, size_t errlen) {
  (void)s, (void)rows, (void)n_rows;
  return _sc_slide_fail(err, errlen,
                        "streamcnn was built without OpenSlide/libtiff "
                        "(STREAMCNN_OPENSLIDE=OFF): cannot write TIFFs");
}

int sc_tiff_stream_close(sc_tiff_stream *s, char *err, size_t errlen) {
  (void)s;
  return _sc_slide_fail(err, errlen,
                        "streamcnn was built without OpenSlide/libtiff "
                        "(STREAMCNN_OPENSLIDE=OFF): cannot write TIFFs");
}

void sc_tiff_stream_abort(sc_tiff_stream *s) { (void)s; }


#else

#include <tiffio.h>

/* libtiff reports through handlers; keep them quiet, we check return
 * codes. Per-handle handlers (libtiff >= 4.5), not the global
 * TIFFSetErrorHandler: that would race between threads writing TIFFs and
 * silence libtiff for OpenSlide and everyone else in the process. */
static int tiff_silent(TIFF *tif, void *user, const char *module,
                       const char *fmt, va_list ap) {
  (void)tif, (void)user, (void)module, (void)fmt, (void)ap;
  return 1; /* handled: the global handlers are not called */
}

static TIFF *tiff_open(const char *path, const char *mode) {
  TIFFOpenOptions *opts = TIFFOpenOptionsAlloc();
  if (!opts) return NULL;
  TIFFOpenOptionsSetErrorHandlerExtR(opts, tiff_silent, NULL);
  TIFFOpenOptionsSetWarningHandlerExtR(opts, tiff_silent, NULL);
  TIFF *t = TIFFOpenExt(path, mode, opts);
  TIFFOpenOptionsFree(opts);
  return t;
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
  TIFF *t = tiff_open(path, bytes > 2e9 ? "w8" : "w");
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
  TIFF *t = tiff_open(path, "w");
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

/* ---- streamed pyramid (sc_tiff_stream_*) ---------------------------------- */

#define SC_STREAM_MAX_LEVELS 32

typedef struct {
  int64_t w, h;     /* level extent in pixels */
  int tile;         /* tile edge of this level */
  TIFF *t;          /* level 0: the output file; others: a temporary file */
  char *tmp;        /* temporary file's path (NULL for level 0); owned */
  uint8_t *band;    /* tile x w x 3: the tile row being filled; owned */
  int64_t filled;   /* rows of band filled */
  int64_t row;      /* rows of this level received so far */
  uint8_t *pend;    /* w x 3: an even row waiting for its pair (for the next
                       level); owned, NULL at the last level */
  uint8_t *next;    /* the next level's width x 3: the row averaged from
                       two of this level's; owned, NULL at the last level */
  int have_pend;
} stream_level;

struct sc_tiff_stream {
  char *path;        /* owned */
  int n_levels;
  int compression;   /* 0 none, 1 deflate */
  double mpp;        /* level 0, <= 0: none */
  int big;           /* BigTIFF */
  uint8_t *tilebuf;  /* tile x tile x 3 staging buffer; owned */
  stream_level lv[SC_STREAM_MAX_LEVELS];
};

static char *dup_printf(const char *fmt, const char *a, int b) {
  int n = snprintf(NULL, 0, fmt, a, b);
  char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
  if (s) snprintf(s, (size_t)n + 1, fmt, a, b);
  return s;
}

/* Tags of level l of s in t (tiled RGB, compression, resolution). */
static int stream_tags(const sc_tiff_stream *s, TIFF *t, int l,
                       const char *description) {
  const stream_level *L = &s->lv[l];
  int ok = set_rgb_tags(t, L->w, L->h, s->compression, 0) &&
           TIFFSetField(t, TIFFTAG_TILEWIDTH, (uint32_t)L->tile) &&
           TIFFSetField(t, TIFFTAG_TILELENGTH, (uint32_t)L->tile) &&
           TIFFSetField(t, TIFFTAG_SUBFILETYPE, l ? FILETYPE_REDUCEDIMAGE : 0);
  if (ok && description)
    ok = TIFFSetField(t, TIFFTAG_IMAGEDESCRIPTION, description);
  if (ok && s->mpp > 0) {
    /* pixels per centimetre of this level: 1e4 um / (mpp * downsample) */
    const double ppcm_x = 1e4 / (s->mpp * (double)s->lv[0].w / (double)L->w);
    const double ppcm_y = 1e4 / (s->mpp * (double)s->lv[0].h / (double)L->h);
    ok = TIFFSetField(t, TIFFTAG_XRESOLUTION, (float)ppcm_x) &&
         TIFFSetField(t, TIFFTAG_YRESOLUTION, (float)ppcm_y) &&
         TIFFSetField(t, TIFFTAG_RESOLUTIONUNIT, RESUNIT_CENTIMETER);
  }
  return ok;
}

/* Free everything s owns; with remove, also delete its files. */
static void stream_free(sc_tiff_stream *s, int remove_files) {
  if (!s) return;
  for (int l = 0; l < s->n_levels; l++) {
    stream_level *L = &s->lv[l];
    if (L->t) TIFFClose(L->t);
    if (L->tmp) {
      remove(L->tmp);  /* temporaries never outlive the stream */
      free(L->tmp);
    }
    free(L->band);
    free(L->pend);
    free(L->next);
  }
  if (remove_files && s->path) remove(s->path);
  free(s->tilebuf);
  free(s->path);
  free(s);
}

sc_tiff_stream *sc_tiff_stream_open(const char *path, int64_t width,
                                    int64_t height, int n_levels, int tile,
                                    int compression, double mpp,
                                    const char *description, char *err,
                                    size_t errlen) {
  if (!path || !*path) {
    _sc_slide_fail(err, errlen, "streamcnn: empty TIFF path");
    return NULL;
  }
  if (width < 1 || height < 1 || width > 0xFFFFFFFFLL || height > 0xFFFFFFFFLL) {
    _sc_slide_fail(err, errlen, "streamcnn: bad TIFF size %lld x %lld",
                   (long long)width, (long long)height);
    return NULL;
  }
  if (n_levels < 1 || n_levels > SC_STREAM_MAX_LEVELS) {
    _sc_slide_fail(err, errlen, "streamcnn: n_levels %d must be in [1, %d]",
                   n_levels, SC_STREAM_MAX_LEVELS);
    return NULL;
  }
  if (tile < 16 || tile > 4096 || tile % 16) {
    _sc_slide_fail(err, errlen,
                   "streamcnn: tile %d must be a multiple of 16 in [16, 4096]", tile);
    return NULL;
  }
  if (compression < 0 || compression > 1) {
    _sc_slide_fail(err, errlen,
                   "streamcnn: stream compression %d must be 0 (none) or 1 (deflate)",
                   compression);
    return NULL;
  }
  if (!(mpp == mpp) || mpp > 1e6) { /* NaN or nonsense; <= 0 means none */
    _sc_slide_fail(err, errlen, "streamcnn: bad mpp %g", mpp);
    return NULL;
  }
  sc_tiff_stream *s = calloc(1, sizeof *s);
  if (!s) {
    _sc_slide_fail(err, errlen, "streamcnn: out of memory");
    return NULL;
  }
  s->n_levels = n_levels;
  s->compression = compression;
  s->mpp = mpp;
  s->big = 3.0 * (double)width * (double)height * 4.0 / 3.0 > 1.8e9;
  int64_t w = width, h = height;
  for (int l = 0; l < n_levels; l++) {
    stream_level *L = &s->lv[l];
    if (l && (w < 1 || h < 1)) break;
    L->w = w, L->h = h;
    /* as sc_tiff_write_pyramid: OpenSlide 3.4.1 misreads a level smaller
     * than one tile */
    const int64_t fit = (w < h ? w : h) / 16 * 16;
    L->tile = fit >= tile ? tile : fit >= 16 ? (int)fit : 16;
    w = (w + 1) / 2, h = (h + 1) / 2;
  }
  s->path = malloc(strlen(path) + 1);
  s->tilebuf = malloc((size_t)tile * tile * 3);
  if (!s->path || !s->tilebuf) {
    _sc_slide_fail(err, errlen, "streamcnn: out of memory opening '%s'", path);
    stream_free(s, 0);
    return NULL;
  }
  strcpy(s->path, path);
  for (int l = 0; l < n_levels; l++) {
    stream_level *L = &s->lv[l];
    L->band = malloc((size_t)L->tile * (size_t)L->w * 3);
    L->pend = l + 1 < n_levels ? malloc((size_t)L->w * 3) : NULL;
    L->next = l + 1 < n_levels ? malloc((size_t)s->lv[l + 1].w * 3) : NULL;
    if (!L->band || (l + 1 < n_levels && (!L->pend || !L->next))) {
      _sc_slide_fail(err, errlen, "streamcnn: out of memory opening '%s'", path);
      stream_free(s, 1);
      return NULL;
    }
    if (l) {
      L->tmp = dup_printf("%s.level%d.tmp", path, l);
      if (!L->tmp) {
        _sc_slide_fail(err, errlen, "streamcnn: out of memory opening '%s'", path);
        stream_free(s, 1);
        return NULL;
      }
    }
    const char *name = l ? L->tmp : path;
    L->t = tiff_open(name, s->big ? "w8" : "w");
    if (!L->t) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot create '%s'", name);
      stream_free(s, 1);
      return NULL;
    }
    if (!stream_tags(s, L->t, l, l ? NULL : description)) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot set the tags of level %d of '%s'",
                     l, path);
      stream_free(s, 1);
      return NULL;
    }
  }
  return s;
}

/* Write level l's filled band as a row of tiles (edge tiles padded white). */
static int stream_flush_band(sc_tiff_stream *s, int l, char *err, size_t errlen) {
  stream_level *L = &s->lv[l];
  if (!L->filled) return SC_OK;
  const int tl = L->tile;
  const int64_t ty = L->row - L->filled;
  for (int64_t tx = 0; tx < L->w; tx += tl) {
    memset(s->tilebuf, 255, (size_t)tl * tl * 3);
    const int64_t cw = L->w - tx < tl ? L->w - tx : tl;
    for (int64_t r = 0; r < L->filled; r++)
      memcpy(s->tilebuf + (size_t)r * tl * 3, L->band + ((size_t)r * L->w + tx) * 3,
             (size_t)cw * 3);
    if (TIFFWriteTile(L->t, s->tilebuf, (uint32_t)tx, (uint32_t)ty, 0, 0) < 0)
      return _sc_slide_fail(err, errlen,
                            "streamcnn: cannot write a tile of level %d of '%s' "
                            "(disk full?)", l, s->path);
  }
  L->filled = 0;
  return SC_OK;
}

static int stream_push(sc_tiff_stream *s, int l, const uint8_t *row, char *err,
                       size_t errlen);

/* The next level's row from rows a and b of level l (b may be a). */
static int stream_down(sc_tiff_stream *s, int l, const uint8_t *a, const uint8_t *b,
                       char *err, size_t errlen) {
  const int64_t w = s->lv[l].w, w2 = s->lv[l + 1].w;
  uint8_t *out = s->lv[l].next;
  for (int64_t x = 0; x < w2; x++) {
    const int64_t x0 = 2 * x, x1 = 2 * x + 1 < w ? 2 * x + 1 : 2 * x;
    for (int c = 0; c < 3; c++) {
      const int sum = a[x0 * 3 + c] + a[x1 * 3 + c] + b[x0 * 3 + c] + b[x1 * 3 + c];
      out[x * 3 + c] = (uint8_t)((sum + 2) / 4);
    }
  }
  /* level l + 1 copies the row (its band, its pend) before it returns */
  return stream_push(s, l + 1, out, err, errlen);
}

/* Row `row` (w x 3) arrives at level l. */
static int stream_push(sc_tiff_stream *s, int l, const uint8_t *row, char *err,
                       size_t errlen) {
  stream_level *L = &s->lv[l];
  if (L->row >= L->h)
    return _sc_slide_fail(err, errlen, "streamcnn: more than %lld rows written to "
                          "level %d of '%s'", (long long)L->h, l, s->path);
  memcpy(L->band + (size_t)L->filled * L->w * 3, row, (size_t)L->w * 3);
  L->filled++, L->row++;
  if ((L->filled == L->tile || L->row == L->h) &&
      stream_flush_band(s, l, err, errlen) != SC_OK)
    return SC_ERR;
  if (l + 1 < s->n_levels) {
    /* the band keeps this row until flushed, but pend must own a copy */
    if (!L->have_pend) {
      memcpy(L->pend, row, (size_t)L->w * 3);
      L->have_pend = 1;
      if (L->row == L->h) { /* odd last row: averaged with itself */
        L->have_pend = 0;
        return stream_down(s, l, L->pend, L->pend, err, errlen);
      }
    } else {
      L->have_pend = 0;
      return stream_down(s, l, L->pend, row, err, errlen);
    }
  }
  return SC_OK;
}

int sc_tiff_stream_write(sc_tiff_stream *s, const uint8_t *rows, int64_t n_rows,
                         char *err, size_t errlen) {
  if (!s || (!rows && n_rows) || n_rows < 0)
    return _sc_slide_fail(err, errlen, "streamcnn: bad stream write arguments");
  if (s->lv[0].row + n_rows > s->lv[0].h)
    return _sc_slide_fail(err, errlen,
                          "streamcnn: %lld rows written to '%s' after %lld of %lld",
                          (long long)n_rows, s->path, (long long)s->lv[0].row,
                          (long long)s->lv[0].h);
  for (int64_t r = 0; r < n_rows; r++)
    if (stream_push(s, 0, rows + (size_t)r * s->lv[0].w * 3, err, errlen) != SC_OK)
      return SC_ERR;
  return SC_OK;
}

/* Append temporary level l's tiles, uncompressed no further, to out. */
static int stream_copy_level(sc_tiff_stream *s, int l, TIFF *out, char *err,
                             size_t errlen) {
  stream_level *L = &s->lv[l];
  TIFFClose(L->t); /* writes its directory */
  L->t = NULL;
  TIFF *in = tiff_open(L->tmp, "r");
  if (!in) return _sc_slide_fail(err, errlen, "streamcnn: cannot reopen '%s'", L->tmp);
  int rc = SC_ERR;
  uint8_t *buf = NULL;
  uint64_t *counts = NULL;
  const uint32_t n = TIFFNumberOfTiles(in);
  if (!TIFFGetField(in, TIFFTAG_TILEBYTECOUNTS, &counts) || !counts) {
    _sc_slide_fail(err, errlen, "streamcnn: '%s' has no tile byte counts", L->tmp);
    goto done;
  }
  uint64_t most = 0;
  for (uint32_t i = 0; i < n; i++) most = counts[i] > most ? counts[i] : most;
  buf = malloc(most ? (size_t)most : 1);
  if (!buf) {
    _sc_slide_fail(err, errlen, "streamcnn: out of memory copying level %d", l);
    goto done;
  }
  if (!stream_tags(s, out, l, NULL)) {
    _sc_slide_fail(err, errlen, "streamcnn: cannot set the tags of level %d of '%s'", l,
                   s->path);
    goto done;
  }
  for (uint32_t i = 0; i < n; i++) {
    const tmsize_t got = TIFFReadRawTile(in, i, buf, (tmsize_t)counts[i]);
    if (got < 0 || TIFFWriteRawTile(out, i, buf, got) < 0) {
      _sc_slide_fail(err, errlen, "streamcnn: cannot copy tile %u of level %d into '%s' "
                     "(disk full?)", i, l, s->path);
      goto done;
    }
  }
  if (!TIFFWriteDirectory(out)) {
    _sc_slide_fail(err, errlen, "streamcnn: cannot write level %d of '%s'", l, s->path);
    goto done;
  }
  rc = SC_OK;
done:
  free(buf);
  TIFFClose(in);
  return rc;
}

int sc_tiff_stream_close(sc_tiff_stream *s, char *err, size_t errlen) {
  if (!s) return _sc_slide_fail(err, errlen, "streamcnn: no TIFF stream");
  int rc = SC_ERR;
  if (s->lv[0].row != s->lv[0].h) {
    _sc_slide_fail(err, errlen, "streamcnn: '%s' got %lld of its %lld rows", s->path,
                   (long long)s->lv[0].row, (long long)s->lv[0].h);
    goto done;
  }
  TIFF *out = s->lv[0].t;
  if (!TIFFWriteDirectory(out)) {
    _sc_slide_fail(err, errlen, "streamcnn: cannot write level 0 of '%s'", s->path);
    goto done;
  }
  for (int l = 1; l < s->n_levels; l++)
    if (stream_copy_level(s, l, out, err, errlen) != SC_OK) goto done;
  s->lv[0].t = NULL;
  if (TIFFFlush(out) != 1) {
    TIFFClose(out);
    _sc_slide_fail(err, errlen, "streamcnn: cannot finish '%s' (disk full?)", s->path);
    goto done;
  }
  TIFFClose(out);
  rc = SC_OK;
done:
  stream_free(s, rc != SC_OK);
  return rc;
}

void sc_tiff_stream_abort(sc_tiff_stream *s) { stream_free(s, 1); }


#endif
