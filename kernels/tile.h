/*
 * tile.h — the tile kernels the replay calls: gather a padded input tile,
 * copy or accumulate a 4-D window (stem output tiles, gradient scatter-add).
 *
 * One parameter struct per kernel, shared by the CPU (kernels/cpu/tile.c)
 * and CUDA (kernels/cuda/tile.cu) variants, which validate it with the same
 * function (sc_*_check below) before touching memory. All strides and
 * extents are in elements, dimension order N, C, H, W. Zero-initialise the
 * structs ({0}) and set every field.
 */
#ifndef STREAMCNN_KERNELS_TILE_H
#define STREAMCNN_KERNELS_TILE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum sc_dtype {
  SC_DTYPE_F32 = 1,
  SC_DTYPE_F64 = 2,
  SC_DTYPE_U8 = 3,  /* a gather's source only: uint8 images */
  SC_DTYPE_F16 = 4, /* IEEE binary16 */
  SC_DTYPE_BF16 = 5
} sc_dtype;

/* A float dtype the kernels compute in (every sc_dtype but uint8). */
static inline int sc_dtype_is_float(int d) {
  return d == SC_DTYPE_F32 || d == SC_DTYPE_F64 || d == SC_DTYPE_F16 ||
         d == SC_DTYPE_BF16;
}

/* dst[n, c, y, x] = src[...]  (or +=) over a window of `size`. */
typedef struct sc_copy_params {
  const void *src;       /* element (0, 0, 0, 0) of the source window */
  int64_t src_stride[4]; /* source strides, elements (0 allowed: broadcast) */
  void *dst;             /* element (0, 0, 0, 0) of the destination window */
  int64_t dst_stride[4]; /* destination strides, elements, no overlap */
  int64_t size[4];       /* window extent N, C, H, W; 0 = nothing to do */
  int dtype;             /* sc_dtype of dst (and of src unless src_dtype) */
  int accumulate;        /* 0: dst = src; 1: dst += src (src may be dst) */
  int src_dtype;         /* 0: as dtype; else the source's float sc_dtype
                            (converted; sums are formed in float/double) */
} sc_copy_params;

/* dst (N x C x dst_h x dst_w, dense: NCHW or channels-last NHWC order) =
 * pad_value everywhere, except the src_h x src_w source window placed at
 * (off_h, off_w), each value of channel c mapped to v * scale[c] +
 * shift[c] when scale is given. Builds the explicitly padded input of a
 * window layer at the true image border, the channels-last copy of an
 * image tile, and the normalised image tile (x - mean) / std straight from
 * its uint8 or float pixels. */
typedef struct sc_gather_params {
  const void *src;       /* element (0, 0, 0, 0) of the source window; may be
                            NULL when src_h or src_w is 0 (all padding) */
  int64_t src_stride[4]; /* source strides, elements */
  int64_t n, c;          /* batch and channels of both */
  int64_t src_h, src_w;  /* source window extent (rows, cols) */
  void *dst;             /* dense destination */
  int64_t dst_h, dst_w;  /* destination extent (rows, cols) */
  int channels_last;     /* 0: dst is NCHW-contiguous, 1: NHWC */
  int64_t off_h, off_w;  /* top-left of the source window inside dst */
  double pad_value;      /* 0 for conv / avg pool, -inf for max pool */
  int dtype;             /* sc_dtype of dst (and of src unless src_dtype) */
  int src_dtype;         /* 0: as dtype; else the source's sc_dtype (uint8
                            or another float dtype), converted */
  const void *scale;     /* NULL: none; else c elements of affine_dtype,
                            scale_stride apart: the source window's values
                            are mapped to v * scale[c] + shift[c] (in float,
                            or double for float64, rounded once); padding
                            is not mapped */
  const void *shift;     /* NULL: 0; else c elements of affine_dtype */
  int64_t scale_stride, shift_stride;
  int affine_dtype;      /* 0: as dtype; else SC_DTYPE_F32 (float32
                            constants for a half-precision tile) */
} sc_gather_params;

/* NULL when p is well-formed, else what is wrong. */
static inline const char *sc_copy_check(const sc_copy_params *p) {
  if (!sc_dtype_is_float(p->dtype)) return "tile copy: unsupported dtype";
  if (p->src_dtype != 0 && !sc_dtype_is_float(p->src_dtype))
    return "tile copy: unsupported source dtype";
  if (p->accumulate != 0 && p->accumulate != 1)
    return "tile copy: accumulate must be 0 or 1";
  for (int i = 0; i < 4; i++)
    if (p->size[i] < 0) return "tile copy: negative extent";
  if (p->size[0] && p->size[1] && p->size[2] && p->size[3] &&
      (!p->src || !p->dst))
    return "tile copy: NULL data pointer";
  return NULL;
}

static inline const char *sc_gather_check(const sc_gather_params *p) {
  if (!sc_dtype_is_float(p->dtype)) return "tile gather: unsupported dtype";
  if (p->src_dtype != 0 && !sc_dtype_is_float(p->src_dtype) &&
      p->src_dtype != SC_DTYPE_U8)
    return "tile gather: unsupported source dtype";
  if (p->n < 0 || p->c < 0 || p->src_h < 0 || p->src_w < 0 || p->dst_h < 0 ||
      p->dst_w < 0 || p->off_h < 0 || p->off_w < 0)
    return "tile gather: negative extent";
  if (p->off_h + p->src_h > p->dst_h || p->off_w + p->src_w > p->dst_w)
    return "tile gather: source window does not fit the destination";
  if (p->channels_last != 0 && p->channels_last != 1)
    return "tile gather: channels_last must be 0 or 1";
  if (p->n && p->c && p->dst_h && p->dst_w && !p->dst)
    return "tile gather: NULL destination";
  if (p->n && p->c && p->src_h && p->src_w && !p->src)
    return "tile gather: NULL source";
  return NULL;
}

/* CPU: SC 0 on success; work is split over torch's intra-op thread pool. */
int sc_copy_cpu(const sc_copy_params *p);
int sc_gather_cpu(const sc_gather_params *p);

/* CUDA: launched on `stream` (a cudaStream_t, the caller's current stream);
 * 0 on success, else a message in err. Never synchronises. */
int sc_copy_cuda(const sc_copy_params *p, void *stream, char *err,
                 size_t errlen);
int sc_gather_cuda(const sc_gather_params *p, void *stream, char *err,
                   size_t errlen);
/* 1 when host memory at p is page-locked and mapped at the same address in
 * the device's address space (cudaHostAlloc / cudaHostRegister under
 * unified addressing, as torch's pin_memory()): kernels may read it
 * directly. 0 for pageable memory (clears the CUDA error it causes). */
int sc_cuda_host_mapped(const void *p);

/* Host -> device prefetch of image regions on a side stream, so that the
 * copy of the next tile's pixels overlaps the current tile's compute. */
typedef struct sc_prefetch {
  void *stream; /* cudaStream_t, non-blocking, owned */
  void *ready;  /* cudaEvent_t recorded on the main stream before a copy */
  void *done;   /* cudaEvent_t recorded on the side stream after it */
} sc_prefetch;
/* Rows [rows[0], rows[1]) x cols [cols[0], cols[1]) of a dense NCHW or
 * NHWC image as the 2-D copies sc_prefetch_copy makes: `planes` planes of
 * `rows` rows of `row_bytes` bytes, read `src_pitch` apart from the image
 * at `offset` + i * `src_plane` (bytes), written densely one after
 * another, which is a tensor of shape N x C x rows x cols in the image's
 * layout with strides dst_stride (elements). */
typedef struct sc_region_copy {
  int64_t offset, planes, src_plane, rows, src_pitch, row_bytes;
  int64_t dst_stride[4];
} sc_region_copy;

/* 1 for a dense NCHW image, 2 for a dense NHWC one (sizes sz, strides st
 * in elements of es bytes; the region inside the image), with *out
 * filled; 0 for any other layout (no plain 2-D copy reads it). */
static inline int sc_region_copy_plan(const int64_t sz[4], const int64_t st[4],
                                      int64_t es, const int64_t rows[2],
                                      const int64_t cols[2],
                                      sc_region_copy *out) {
  const int64_t N = sz[0], C = sz[1], H = sz[2], W = sz[3];
  const int64_t nr = rows[1] - rows[0], nc = cols[1] - cols[0];
  int64_t px; /* elements per pixel in a row: 1 (NCHW) or C (NHWC) */
  int kind;
  if (st[3] == 1 && st[2] == W && st[1] == H * W && st[0] == C * H * W) {
    kind = 1;
    px = 1;
    out->planes = N * C; /* one plane per (n, c) */
    out->src_plane = H * W * es;
    const int64_t d[4] = {C * nr * nc, nr * nc, nc, 1};
    memcpy(out->dst_stride, d, sizeof d);
  } else if (st[1] == 1 && st[3] == C && st[2] == W * C && st[0] == H * W * C) {
    kind = 2;
    px = C;
    out->planes = N; /* one plane per n, pixels of C channels */
    out->src_plane = H * W * C * es;
    const int64_t d[4] = {nr * nc * C, 1, nc * C, C};
    memcpy(out->dst_stride, d, sizeof d);
  } else {
    return 0;
  }
  out->offset = (rows[0] * W + cols[0]) * px * es;
  out->rows = nr;
  out->src_pitch = W * px * es;
  out->row_bytes = nc * px * es;
  return kind;
}

/* Create the side stream and events on the current device. */
int sc_prefetch_open(sc_prefetch *f, char *err, size_t errlen);
/* Wait for the side stream, then destroy it (NULL members: no-op). */
void sc_prefetch_close(sc_prefetch *f);
/* Copy the region `rc` (sc_region_copy_plan) of the host image whose
 * element (0, 0, 0, 0) is at `image` to the dense device buffer dst, on
 * the side stream, after the work queued so far on main_stream (dst may
 * be memory it just freed). */
int sc_prefetch_copy(sc_prefetch *f, void *main_stream, void *dst,
                     const void *image, const sc_region_copy *rc, char *err,
                     size_t errlen);
/* Make main_stream wait for the last sc_prefetch_copy. */
int sc_prefetch_wait(sc_prefetch *f, void *main_stream, char *err,
                     size_t errlen);

/* Pinned host memory read by kernels outlives the call only as long as
 * its tensor does: torch's host allocator may hand the block out again as
 * soon as the tensor is freed, and it knows nothing of our kernels. Record
 * *event (created on first use) on stream after such a kernel; before the
 * call returns, sc_host_reads_wait blocks until the last recorded point
 * has run and destroys the event (NULL: no-op). */
int sc_host_reads_mark(void **event, void *stream, char *err, size_t errlen);
void sc_host_reads_wait(void **event);

#ifdef __cplusplus
}
#endif

#endif /* STREAMCNN_KERNELS_TILE_H */
