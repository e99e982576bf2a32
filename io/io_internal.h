/*
 * io_internal.h — private declarations shared by the files of io/ (the
 * whole-slide reader slide.c, its pre-OpenSlide TIFF check tiffcheck.c
 * and the TIFF writers tiffwrite.c). io/ is no
 * part of the operator: it needs neither torch nor op/'s internals, only
 * the public status codes and SC_API of streamcnn.h.
 */
#ifndef STREAMCNN_IO_INTERNAL_H
#define STREAMCNN_IO_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "slide.h"

/* printf into err (when given); returns SC_ERR. */
int _sc_slide_fail(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* A tiled directory of a TIFF: its size, its tiles' and its Compression. */
typedef struct {
  uint64_t w, h, tw, th;
  uint64_t compression;
} sc_tiff_dir;

/* tiffcheck.c: SC_OK unless path is a TIFF with a directory OpenSlide
 * must not be given (message in err); SC_OK for files that are no TIFF.
 * When dirs is given, *dirs gets the tiled directories in file order
 * (malloc'd, the caller frees; NULL when none) and *n_dirs their count. */
int _sc_tiff_precheck(const char *path, sc_tiff_dir **dirs, int *n_dirs,
                      char *err, size_t errlen);

#endif /* STREAMCNN_IO_INTERNAL_H */
