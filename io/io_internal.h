/*
 * io_internal.h — private declarations shared by the files of io/ (the
 * whole-slide reader slide.c and the TIFF writers tiffwrite.c). io/ is no
 * part of the operator: it needs neither torch nor op/'s internals, only
 * the public status codes and SC_API of streamcnn.h.
 */
#ifndef STREAMCNN_IO_INTERNAL_H
#define STREAMCNN_IO_INTERNAL_H

#include <stddef.h>

#include "slide.h"

/* printf into err (when given); returns SC_ERR. */
int _sc_slide_fail(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#endif /* STREAMCNN_IO_INTERNAL_H */
