/*
 * validate.c — the checks of one call's arguments before anything runs:
 * the image (layout, dims, dtype, device, channels), every parameter's
 * dtype, device and shape against its instruction, and the compute dtype
 * and device the call runs in (set in the ctx). Also the tensor reader
 * the drivers use for their own checks (_sc_describe, _sc_on_compute).
 *
 * Owns nothing. Calls: run.c (_sc_dtype_size), analysis.c. Called by
 * register.c (_sc_validate) and replay.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* Shape, strides (borrowed: valid while t lives), dtype and device of t;
 * on failure what names t (`what`) goes into the error. */
int _sc_describe(sc_ctx *ctx, AtenTensorHandle t, const char *what,
                 int64_t *dim, int64_t **sz, int64_t **st, int32_t *dtype,
                 int32_t *dt, int32_t *di) {
  int32_t layout;
  if (aoti_torch_get_layout(t, &layout))
    return sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
  if (layout != aoti_torch_layout_strided())
    return sc_fail(&ctx->err,
                   "streamcnn: %s must be a dense (strided) tensor, not "
                   "sparse or mkldnn: call .to_dense()",
                   what);
  if (_sc_meta(ctx, t, dim, sz, st) || aoti_torch_get_dtype(t, dtype) ||
      aoti_torch_get_device_type(t, dt) || aoti_torch_get_device_index(t, di))
    return sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
  return SC_OK;
}

/* dtype and device are those of the computation. */
int _sc_on_compute(const sc_ctx *ctx, int32_t dtype, int32_t dt, int32_t di) {
  return dtype == ctx->dtype && dt == ctx->device_type &&
         di == ctx->device_index;
}

static const char *dtype_name(int32_t d) {
  if (d == aoti_torch_dtype_float32()) return "float32";
  if (d == aoti_torch_dtype_float64()) return "float64";
  if (d == aoti_torch_dtype_float16()) return "float16";
  if (d == aoti_torch_dtype_bfloat16()) return "bfloat16";
  return "a non-float dtype";
}

/* Check params[k] has the image's dtype and device and the given shape
 * (ndim -1: any shape of shape[0] elements with at most one dim > 1). */
static int check_param(sc_ctx *ctx, const sc_call *call, int64_t i,
                       const char *role, int64_t k, int64_t ndim,
                       const int64_t *shape, int32_t want,
                       const char *against) {
  if (k < 0) return SC_OK;
  AtenTensorHandle t = call->params[k];
  const sc_instr *in = &call->prog->instr[i];
  int64_t dim, *sz, *st;
  int32_t dtype, dt, di;
  char what[40];
  snprintf(what, sizeof what, "params[%lld]", (long long)k);
  if (_sc_describe(ctx, t, what, &dim, &sz, &st, &dtype, &dt, &di))
    return SC_ERR;
  if (dtype != want)
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) is "
                   "%s but %s %s: convert the module and the image to one "
                   "dtype%s",
                   (long long)k, role, (long long)i, _sc_op_name(in->op),
                   dtype_name(dtype),
                   against, dtype_name(want),
                   _sc_is_half(ctx) && in->op == SC_OP_BATCHNORM
                       ? " (a batch norm's parameters may instead all be "
                         "float32)"
                       : "");
  if (dt != ctx->device_type || di != ctx->device_index)
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) is "
                   "on another device than the image",
                   (long long)k, role, (long long)i, _sc_op_name(in->op));
  int ok;
  if (ndim < 0) { /* per-channel: shape[0] elements, one dim holds them */
    int64_t numel = 1, big = 0;
    for (int64_t d = 0; d < dim; d++) {
      numel *= sz[d];
      big += sz[d] > 1;
    }
    ok = dim >= 1 && dim <= 4 && numel == shape[0] && big <= 1;
    ndim = 1;
  } else {
    ok = dim == ndim;
    for (int64_t d = 0; ok && d < ndim; d++) ok = sz[d] == shape[d];
  }
  if (!ok) {
    char want[96] = "", got[96] = "";
    for (int64_t d = 0; d < ndim; d++)
      snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld",
               d ? ", " : "", (long long)shape[d]);
    for (int64_t d = 0; d < dim && d < 8; d++)
      snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld",
               d ? ", " : "", (long long)sz[d]);
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) has "
                   "shape [%s], expected [%s]",
                   (long long)k, role, (long long)i, _sc_op_name(in->op), got,
                   want);
  }
  return SC_OK;
}

/* Whether params[k] is float32. */
static int param_float32(const sc_call *call, int64_t k) {
  int32_t dtype;
  return k >= 0 && !aoti_torch_get_dtype(call->params[k], &dtype) &&
         dtype == aoti_torch_dtype_float32();
}

/* Whether batch norm `in` holds float32 statistics (its running_mean). */
static int bn_float32(const sc_call *call, const sc_instr *in) {
  return param_float32(call, in->bn_mean);
}

int _sc_validate(sc_ctx *ctx, const sc_call *call) {
  const sc_program *p = call->prog;
  int64_t dim, *sz, *st;
  int32_t dtype, dt, di;
  if (_sc_describe(ctx, call->image, "the image tensor", &dim, &sz, &st, &dtype,
                   &dt, &di))
    return SC_ERR;
  if (dim != 4)
    return sc_fail(&ctx->err,
                   "streamcnn: image must be a 4-D N x C x H x W tensor, got "
                   "%lld dimensions",
                   (long long)dim);
  ctx->image_dtype = dtype;
  /* an image in host memory with the parameters on a CUDA device: tiles
   * are streamed to the device */
  if (dt == aoti_torch_device_type_cpu() && p->n_params > 0) {
    int32_t pdt, pdi;
    if (aoti_torch_get_device_type(call->params[0], &pdt) ||
        aoti_torch_get_device_index(call->params[0], &pdi))
      return sc_fail(&ctx->err, "streamcnn: cannot read params[0]");
    if (pdt == aoti_torch_device_type_cuda()) {
      ctx->image_host = 1;
      dt = pdt;
      di = pdi;
    }
  }
  ctx->image_u8 = dtype == aoti_torch_dtype_uint8();
  if (ctx->image_u8) {
    /* uint8 pixels are converted in the tile gather; the computation runs
     * in the parameters' dtype (float32 without parameters): their
     * narrowest (batch norms' and mean / std may be float32 in a half
     * precision computation), the first of two of one width */
    dtype = aoti_torch_dtype_float32();
    int width = 0;
    for (int64_t k = 0; k < p->n_params; k++) {
      int32_t d;
      if (aoti_torch_get_dtype(call->params[k], &d))
        return sc_fail(&ctx->err, "streamcnn: cannot read params[%lld]",
                       (long long)k);
      const int w = _sc_dtype_size(d);
      if (k == 0 || (w > 1 && w < width)) { /* floats only */
        dtype = d;
        width = w;
      }
    }
  }
  ctx->kdtype = _sc_kdtype(dtype);
  if (ctx->kdtype == SC_DTYPE_U8) ctx->kdtype = 0;
  if (!ctx->kdtype && ctx->image_u8)
    return sc_fail(&ctx->err,
                   "streamcnn: with a uint8 image the parameters set the "
                   "compute dtype and must be float16, bfloat16, float32 "
                   "or float64");
  if (!ctx->kdtype)
    return sc_fail(&ctx->err,
                   "streamcnn: image must be uint8, float16, bfloat16, "
                   "float32 or float64 (got dtype code %d)",
                   (int)dtype);
  ctx->dtype = dtype;
  ctx->device_type = dt;
  ctx->device_index = di;
  if (dt == aoti_torch_device_type_cuda()) {
    ctx->is_cuda = 1;
#ifndef SC_WITH_CUDA
    return sc_fail(&ctx->err,
                   "streamcnn: the image is on a CUDA device but this library "
                   "was built without CUDA (STREAMCNN_CUDA=OFF)");
#endif
  } else if (dt != aoti_torch_device_type_cpu()) {
    return sc_fail(&ctx->err,
                   "streamcnn: the image must be on the CPU or a CUDA device");
  }
  if (sz[1] != p->in_channels)
    return sc_fail(&ctx->err,
                   "streamcnn: the stem expects %lld input channels, the "
                   "image has %lld (shape [%lld, %lld, %lld, %lld])",
                   (long long)p->in_channels, (long long)sz[1],
                   (long long)sz[0], (long long)sz[1], (long long)sz[2],
                   (long long)sz[3]);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int64_t c = p->channels[in->in[0]];
    const int64_t vec[1] = {c};
    int32_t want = ctx->dtype;
    const char *against = ctx->image_u8
                              ? "the computation (uint8 image: its "
                                "parameters' narrowest dtype) is"
                              : "the image is";
    if (in->op == SC_OP_BATCHNORM && _sc_is_half(ctx) &&
        bn_float32(call, in)) {
      /* float32 statistics and affine parameters with float16 / bfloat16
       * values, as torch.autocast leaves a batch norm's */
      want = aoti_torch_dtype_float32();
      against = "its running_mean is";
    } else if (i == 0 && _sc_is_half(ctx) && _sc_image_affine_shape(p) &&
               param_float32(call, in->weight)) {
      /* mean / std in float32 for a half-precision stem (the image gather
       * applies them in float32 and rounds once) */
      want = aoti_torch_dtype_float32();
      against = "its weight is";
      ctx->affine_f32 = 1;
    }
    if (in->op == SC_OP_CONV) {
      const int64_t w[4] = {in->c_out, in->c_in / in->groups, in->win[0].k,
                            in->win[1].k};
      const int64_t b[1] = {in->c_out};
      if (check_param(ctx, call, i, "weight", in->weight, 4, w,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, b,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_LAYERNORM_C) {
      if (check_param(ctx, call, i, "weight", in->weight, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, vec,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_LINEAR_C) {
      const int64_t w[2] = {in->c_out, in->c_in};
      const int64_t b[1] = {in->c_out};
      if (check_param(ctx, call, i, "weight", in->weight, 2, w,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, b,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_SCALE_C) {
      if (check_param(ctx, call, i, "scale", in->weight, -1, vec,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_BATCHNORM) {
      if (check_param(ctx, call, i, "weight", in->bn_weight, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bn_bias, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "running_mean", in->bn_mean, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "running_var", in->bn_var, 1, vec,
                      want, against))
        return SC_ERR;
    }
  }
  return SC_OK;
}
