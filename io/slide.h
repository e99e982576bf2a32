/*
 * slide.h — whole-slide images in: a reader on OpenSlide (slide.c) and a
 * writer of pyramidal tiled TIFFs for synthetic slides (tiffwrite.c).
 *
 * Plain C, no torch: Python reaches these through ctypes and passes the
 * data pointer of a uint8 tensor it allocated. Functions that can fail
 * return SC_OK / SC_ERR and write a message (naming the file) into err.
 * Built without OpenSlide / libtiff (STREAMCNN_OPENSLIDE=OFF), every
 * function fails with a message saying so.
 */
#ifndef STREAMCNN_SLIDE_H
#define STREAMCNN_SLIDE_H

#include "streamcnn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sc_slide sc_slide;

/* 1 when built with OpenSlide and libtiff. */
SC_API int sc_slide_available(void);

/* Open a slide. Returns NULL with a message in err when the file is
 * missing, not a regular file, not in a format OpenSlide reads, or broken.
 * The caller owns the result: release with sc_slide_close (NULL is a no-op).
 * A handle is safe to read from several threads; close it from one. */
SC_API sc_slide *sc_slide_open(const char *path, char *err, size_t errlen);
SC_API void sc_slide_close(sc_slide *s);

SC_API int32_t sc_slide_level_count(const sc_slide *s);
/* Level extent in pixels and downsample w.r.t. level 0. */
SC_API int sc_slide_level(const sc_slide *s, int32_t level, int64_t *w,
                          int64_t *h, double *downsample);
/* 1 when OpenSlide reads `level` wrong, without an error, and sc_slide_read
 * refuses it: a TIFF level narrower or shorter than its tiles whose tiles
 * are not JPEG (OpenSlide 3.4 with libtiff 4.5 shears its rows). Read a
 * finer level and resample it (sc_resample_u8) instead; a level 0 of that
 * kind (an image smaller than one tile) needs another decoder. 0 for a
 * level read right, -1 for no slide or no such level. */
SC_API int sc_slide_level_sheared(const sc_slide *s, int32_t level);
/* OpenSlide property value, or NULL; owned by the slide. */
SC_API const char *sc_slide_property(const sc_slide *s, const char *name);
/* NULL-terminated list of property names; owned by the slide. */
SC_API const char *const *sc_slide_property_names(const sc_slide *s);
/* Background colour (openslide.background-color, default white). */
SC_API void sc_slide_background(const sc_slide *s, uint8_t rgb[3]);

/* Read the w x h pixels of `level` whose top-left is (x, y) in level-0
 * coordinates (OpenSlide's convention) into out: uint8 RGB, 3 x h x w
 * (planar) or h x w x 3 (hwc = 1), 3 * w * h bytes owned by the caller.
 * OpenSlide's premultiplied ARGB is composited over the background colour:
 * out = c + (255 - alpha) * background / 255 (rounded), so transparent and
 * out-of-bounds pixels become the background. The region is read in
 * 512 x 512 chunks by `threads` threads (1 .. 64) on this one handle, each
 * with a chunk-sized buffer: no full ARGB copy of the region exists. The
 * chunk grid does not depend on `threads`: results are identical for any
 * count. At levels with an integer downsample the result is exactly one
 * openslide_read_region of the region; at others (odd level-0 extents)
 * OpenSlide resamples at a sub-pixel offset per chunk (< 0.5 / downsample).
 * OpenSlide's errors latch on the handle (reopen to recover). */
SC_API int sc_slide_read(sc_slide *s, int32_t level, int64_t x, int64_t y,
                         int64_t w, int64_t h, uint8_t *out, int hwc,
                         int threads, char *err, size_t errlen);

/* The part (bx, by) + bw x bh (level pixels, relative to the region's
 * top-left) of the region that sc_slide_read(s, level, x, y, w, h, ...)
 * reads, pixel for pixel as that call gives it (the same chunk grid, so
 * also at levels whose downsample is not an integer), into out: 3 x bh x bw
 * or bh x bw x 3 bytes owned by the caller. Only the chunks that meet the
 * part are read. The part must lie inside the region. */
SC_API int sc_slide_read_box(sc_slide *s, int32_t level, int64_t x, int64_t y,
                             int64_t w, int64_t h, int64_t bx, int64_t by,
                             int64_t bw, int64_t bh, uint8_t *out, int hwc,
                             int threads, char *err, size_t errlen);

/* --- resampling (resample.c; needs no OpenSlide) ---------------------------
 * Antialiased bilinear resampling of uint8 planes (a triangle filter
 * stretched by the downscale factor, as Pillow's and torch's antialias) in
 * fixed point: integer weights of 22 fraction bits summing to exactly
 * 1 << 22 per output pixel, integer sums, rows resampled first (rounded to
 * uint8), then columns. Each output pixel depends only on its indices and
 * its source pixels, so a box of the output is computed bit for bit as the
 * same box of the whole resample: read only the source rows a band needs
 * (sc_resample_span) and resample the band. A constant image stays
 * constant; equal sizes copy. */

/* The source indices [span[0], span[1]) that output indices [out_lo,
 * out_hi) read, along one axis of an in_size -> out_size resample
 * (1 <= sizes <= 2^31, 0 <= out_lo < out_hi <= out_size). */
SC_API int sc_resample_span(int64_t in_size, int64_t out_size, int64_t out_lo,
                            int64_t out_hi, int64_t span[2], char *err,
                            size_t errlen);

/* Arguments of sc_resample_u8 (zero-initialise; sizes in pixels). */
typedef struct sc_resample_args {
  const uint8_t *src;    /* planes x src_h x src_w, contiguous: the part of
                            the source held (caller's, only read) */
  int64_t planes;        /* 1 .. 4096 */
  int64_t src_y, src_x;  /* the part's offset in the whole source */
  int64_t src_h, src_w;  /* the part's extent */
  int64_t in_h, in_w;    /* the whole source */
  int64_t out_h, out_w;  /* the whole result */
  int64_t box_y, box_x;  /* the part of the result computed: offset ... */
  int64_t box_h, box_w;  /* ... and extent */
  uint8_t *dst;          /* planes x box_h x box_w, contiguous (caller's) */
  int threads;           /* 1 .. 64 threads over 64-row strips; the result
                            does not depend on it */
  const uint8_t *fill;   /* NULL, or one value per plane: every source pixel
                            outside the part held is that value (caller's) */
} sc_resample_args;

/* Resample: the box of the in_h x in_w -> out_h x out_w result into dst.
 * Without a fill the source part must hold the spans the box reads
 * (refused with both ranges named otherwise); with one, what it does not
 * hold is the fill, bit for bit as a source holding the fill there (a
 * slide region mostly past the slide's edge is resampled from the part on
 * the slide and its background colour). Memory: per thread one strip of
 * rows-resampled source rows (box_w x (64 x in_h / out_h + 3) bytes) and
 * the weights. */
SC_API int sc_resample_u8(const sc_resample_args *args, char *err,
                          size_t errlen);

/* Write a pyramidal tiled TIFF: n_levels RGB images (h x w x 3 uint8,
 * row-major), level 0 first, the others marked SUBFILETYPE=REDUCEDIMAGE.
 * compression: 1 deflate (lossless), 2 JPEG (quality 1 .. 100). tile: edge
 * in pixels, a multiple of 16. description: ImageDescription of level 0
 * (e.g. "Aperio ...|MPP = 0.25|AppMag = 40" for an Aperio-style .svs), or
 * NULL. BigTIFF when the data exceeds 2 GB. */
SC_API int sc_tiff_write_pyramid(const char *path, int n_levels,
                                 const uint8_t *const *levels,
                                 const int64_t *widths, const int64_t *heights,
                                 int tile, int compression, int quality,
                                 const char *description, char *err,
                                 size_t errlen);

/* A pyramidal tiled TIFF written as a stream of rows: for maps too large
 * to hold (a heatmap at full resolution). sc_tiff_stream_open creates the
 * file for a width x height RGB level 0 and n_levels - 1 reduced levels,
 * each half the previous (ceil; 2 x 2 means rounded half up, an odd last
 * row / column averaged with itself, as synthetic.downsample2).
 * sc_tiff_stream_write takes the next n_rows rows of level 0 (n_rows x
 * width x 3 uint8, row-major, owned by the caller, only read); every row
 * goes into a one-tile-row buffer per level (tile x width x 3 bytes at
 * level 0, written out as tiles when full) and is averaged into the next
 * level on the way. Reduced levels are written, as they fill, to
 * temporary tiled TIFFs beside path (path + ".levelN.tmp"), whose tiles
 * sc_tiff_stream_close copies without recompression into path as
 * SUBFILETYPE=REDUCEDIMAGE directories before deleting them. Memory: one
 * tile row per level plus a row; never a whole level.
 * tile: edge, a multiple of 16 in [16, 4096] (levels smaller than a tile
 * get the largest multiple of 16 that fits, as sc_tiff_write_pyramid);
 * compression: 0 none, 1 deflate; mpp > 0: level 0's microns per pixel,
 * written as resolution tags (pixels per centimetre) of every level;
 * description: ImageDescription of level 0 or NULL (an Aperio-style one
 * makes OpenSlide report openslide.mpp-x). BigTIFF when the data may
 * exceed 2 GB.
 * The caller owns the stream and ends it with exactly one of
 * sc_tiff_stream_close (which fails unless all height rows were written)
 * or sc_tiff_stream_abort; both free it, and on failure or abort remove
 * path and the temporary files (no partial file is left). */
typedef struct sc_tiff_stream sc_tiff_stream;
SC_API sc_tiff_stream *sc_tiff_stream_open(const char *path, int64_t width,
                                           int64_t height, int n_levels,
                                           int tile, int compression,
                                           double mpp,
                                           const char *description,
                                           char *err, size_t errlen);
SC_API int sc_tiff_stream_write(sc_tiff_stream *s, const uint8_t *rows,
                                int64_t n_rows, char *err, size_t errlen);
SC_API int sc_tiff_stream_close(sc_tiff_stream *s, char *err, size_t errlen);
SC_API void sc_tiff_stream_abort(sc_tiff_stream *s); /* NULL: no-op */

/* A plain striped (untiled) RGB TIFF: not a slide; for tests. */
SC_API int sc_tiff_write_striped(const char *path, const uint8_t *rgb,
                                 int64_t w, int64_t h, char *err,
                                 size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* STREAMCNN_SLIDE_H */
