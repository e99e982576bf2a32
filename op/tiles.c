/*
 * tiles.c — tensor-level front of the tile kernels (kernels/tile.h): reads
 * sizes, strides and data pointers through the shim, fills the kernel
 * parameter structs and routes to the CPU or CUDA variant.
 */
#define STREAMCNN_TORCH
#include "internal.h"

#include "tile.h"

#include <stdio.h>

/* sizes/strides of a tensor of rank <= 4 as 4-D, leading dims of 1. */
static int as4d(sc_ctx *ctx, AtenTensorHandle t, int64_t size[4],
                int64_t stride[4]) {
  int64_t dim, *sz, *st;
  if (_sc_meta(ctx, t, &dim, &sz, &st)) return SC_ERR;
  if (dim > 4)
    return sc_fail(&ctx->err, "streamcnn: internal error: rank %lld > 4",
                   (long long)dim);
  for (int i = 0; i < 4; i++) {
    int64_t j = i - (4 - dim);
    size[i] = j >= 0 ? sz[j] : 1;
    stride[i] = j >= 0 ? st[j] : 0;
  }
  return SC_OK;
}

static int data_ptr(sc_ctx *ctx, AtenTensorHandle t, void **p) {
  if (aoti_torch_get_data_ptr(t, p))
    return sc_fail(&ctx->err, "streamcnn: cannot read a tensor's data");
  return SC_OK;
}

static int run_copy(sc_ctx *ctx, const sc_copy_params *p) {
  if (!ctx->is_cuda) {
    if (sc_copy_cpu(p))
      return sc_fail(&ctx->err, "streamcnn: tile copy failed on the CPU");
    return SC_OK;
  }
#ifdef SC_WITH_CUDA
  char msg[256];
  if (sc_copy_cuda(p, ctx->stream, msg, sizeof msg))
    return sc_fail(&ctx->err, "streamcnn: CUDA tile copy: %s", msg);
  return SC_OK;
#else
  return sc_fail(&ctx->err, "streamcnn: this library was built without CUDA");
#endif
}

static int run_gather(sc_ctx *ctx, const sc_gather_params *p) {
  if (!ctx->is_cuda) {
    if (sc_gather_cpu(p))
      return sc_fail(&ctx->err, "streamcnn: tile gather failed on the CPU");
    return SC_OK;
  }
#ifdef SC_WITH_CUDA
  char msg[256];
  if (sc_gather_cuda(p, ctx->stream, msg, sizeof msg))
    return sc_fail(&ctx->err, "streamcnn: CUDA tile gather: %s", msg);
  return SC_OK;
#else
  return sc_fail(&ctx->err, "streamcnn: this library was built without CUDA");
#endif
}

int _sc_copy(sc_ctx *ctx, AtenTensorHandle dst, AtenTensorHandle src,
             int accumulate) {
  sc_copy_params p = {0};
  int64_t dsize[4];
  if (as4d(ctx, src, p.size, p.src_stride) ||
      as4d(ctx, dst, dsize, p.dst_stride))
    return SC_ERR;
  for (int i = 0; i < 4; i++)
    if (dsize[i] != p.size[i])
      return sc_fail(&ctx->err,
                     "streamcnn: internal error: copy of %lldx%lldx%lldx%lld "
                     "into %lldx%lldx%lldx%lld",
                     (long long)p.size[0], (long long)p.size[1],
                     (long long)p.size[2], (long long)p.size[3],
                     (long long)dsize[0], (long long)dsize[1],
                     (long long)dsize[2], (long long)dsize[3]);
  void *s, *d;
  int32_t sdt, ddt;
  if (data_ptr(ctx, src, &s) || data_ptr(ctx, dst, &d)) return SC_ERR;
  if (aoti_torch_get_dtype(src, &sdt) || aoti_torch_get_dtype(dst, &ddt))
    return sc_fail(&ctx->err, "streamcnn: cannot read a tile's dtype");
  p.src = s;
  p.dst = d;
  p.dtype = _sc_kdtype(ddt); /* e.g. float32 sums of float16 gradients */
  p.src_dtype = _sc_kdtype(sdt);
  p.accumulate = accumulate;
  return run_copy(ctx, &p);
}

int _sc_is_channels_last(sc_ctx *ctx, AtenTensorHandle t) {
  int64_t dim, *sz, *st;
  if (_sc_meta(ctx, t, &dim, &sz, &st)) return 0;
  return dim == 4 && sz[1] > 1 && st[1] == 1;
}

/* Data pointer, element stride and sc_dtype of a per-channel vector (c
 * elements, e.g. a depthwise 1 x 1 convolution's weight C x 1 x 1 x 1) in
 * the computation's dtype or float32. */
static int channel_vector(sc_ctx *ctx, AtenTensorHandle t, int64_t c,
                          const void **ptr, int64_t *stride, int *kdt) {
  int64_t dim, *sz, *st, numel = 1;
  int32_t dt;
  void *d;
  if (_sc_meta(ctx, t, &dim, &sz, &st) || aoti_torch_get_dtype(t, &dt) ||
      data_ptr(ctx, t, &d))
    return SC_ERR;
  for (int64_t i = 0; i < dim; i++) numel *= sz[i];
  *kdt = _sc_kdtype(dt);
  if (dim < 1 || numel != c || sz[0] != c ||
      (*kdt != ctx->kdtype && *kdt != SC_DTYPE_F32))
    return sc_fail(&ctx->err, "streamcnn: internal error: channel vector");
  *ptr = d;
  *stride = st[0];
  return SC_OK;
}

static int gather(sc_ctx *ctx, AtenTensorHandle src, int64_t n, int64_t c,
                  int64_t dst_h, int64_t dst_w, int64_t off_h, int64_t off_w,
                  double pad_value, int channels_last, AtenTensorHandle scale,
                  AtenTensorHandle shift, AtenTensorHandle *out) {
  sc_gather_params p = {0};
  const int64_t shape[4] = {n, c, dst_h, dst_w};
  /* NHWC: strides (h w c, 1, w c, c) */
  const int64_t nhwc[4] = {dst_h * dst_w * c, 1, dst_w * c, c};
  *out = NULL;
  if (src) {
    int64_t size[4];
    void *s;
    if (as4d(ctx, src, size, p.src_stride) || data_ptr(ctx, src, &s))
      return SC_ERR;
    if (size[0] != n || size[1] != c)
      return sc_fail(&ctx->err, "streamcnn: internal error: gather shape");
    int32_t sdt;
    if (aoti_torch_get_dtype(src, &sdt))
      return sc_fail(&ctx->err, "streamcnn: cannot read a tile's dtype");
    p.src_dtype = _sc_kdtype(sdt);
    p.src = s;
    p.src_h = size[2];
    p.src_w = size[3];
  }
  int adt = 0, bdt = 0;
  if ((scale &&
       channel_vector(ctx, scale, c, &p.scale, &p.scale_stride, &adt)) ||
      (shift && channel_vector(ctx, shift, c, &p.shift, &p.shift_stride, &bdt)))
    return SC_ERR;
  if (scale && shift && adt != bdt)
    return sc_fail(&ctx->err, "streamcnn: internal error: affine dtypes");
  p.affine_dtype = adt == ctx->kdtype ? 0 : adt;
  if (channels_last) {
    if (aoti_torch_empty_strided(4, shape, nhwc, ctx->dtype, ctx->device_type,
                                 ctx->device_index, out))
      return _sc_oom(ctx, "a tile", 4, shape, ctx->dtype, ctx->device_type);
  } else if (_sc_empty(ctx, 4, shape, out)) {
    return SC_ERR;
  }
  void *d;
  if (data_ptr(ctx, *out, &d)) {
    _sc_drop(out);
    return SC_ERR;
  }
  p.n = n;
  p.c = c;
  p.dst = d;
  p.dst_h = dst_h;
  p.dst_w = dst_w;
  p.off_h = src ? off_h : 0; /* no source: all padding */
  p.off_w = src ? off_w : 0;
  p.pad_value = pad_value;
  p.dtype = ctx->kdtype;
  p.channels_last = channels_last;
  if (run_gather(ctx, &p)) {
    _sc_drop(out);
    return SC_ERR;
  }
  return SC_OK;
}

int _sc_gather(sc_ctx *ctx, AtenTensorHandle src, int64_t n, int64_t c,
               int64_t dst_h, int64_t dst_w, int64_t off_h, int64_t off_w,
               double pad_value, int channels_last, AtenTensorHandle *out) {
  return gather(ctx, src, n, c, dst_h, dst_w, off_h, off_w, pad_value,
                channels_last, NULL, NULL, out);
}

int _sc_gather_affine(sc_ctx *ctx, AtenTensorHandle src, int64_t n,
                      int64_t c, int channels_last, AtenTensorHandle scale,
                      AtenTensorHandle shift, AtenTensorHandle *out) {
  int64_t size[4], stride[4];
  if (as4d(ctx, src, size, stride)) return SC_ERR;
  return gather(ctx, src, n, c, size[2], size[3], 0, 0, 0.0, channels_last,
                scale, shift, out);
}

int _sc_make_contiguous(sc_ctx *ctx, AtenTensorHandle *t) {
  bool contiguous = false;
  if (aoti_torch_is_contiguous(*t, &contiguous))
    return sc_fail(&ctx->err, "streamcnn: cannot read tensor layout");
  if (contiguous) return SC_OK;
  int64_t dim, *sz, *st;
  AtenTensorHandle c = NULL;
  if (_sc_meta(ctx, *t, &dim, &sz, &st) || _sc_empty(ctx, dim, sz, &c))
    return SC_ERR;
  if (_sc_copy(ctx, c, *t, 0)) {
    _sc_drop(&c);
    return SC_ERR;
  }
  _sc_drop(t);
  *t = c;
  return SC_OK;
}
