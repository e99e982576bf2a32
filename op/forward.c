/*
 * forward.c — the forward of one tile: for each value the geometry
 * (geometry.c) gives the span the tile needs, and the program runs on
 * those spans only. Window layers run with padding 0 on an input that is
 * explicitly padded where (and only where) it crosses the true border of
 * its value (_sc_layer_input), so every tile computes exactly the values
 * of the whole-image pass; average pools divide by ATen's divisors there.
 *
 * Owns: layer inputs (padded copies or views), the per-instruction
 * forward (in place where nothing else reads the input), the image tile
 * (dense copy, channels-last, the normalisation fused into its gather),
 * freeing values after their last consumer unless the backward keeps
 * them, and the tile's part of the stem output (_sc_forward_into).
 * Calls: run.c, halo.c (cached plans), hostimage.c (host images).
 * Called by fold.c and backward.c (inputs again), replay.c (drivers).
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <math.h>
#include <stdlib.h>

/* Per output row (or col) of a pool over an input of extent n: the divisor
 * factor ATen uses (count_include_pad: window clipped to n + pad; else
 * window clipped to [0, n)). Returns 1 when every factor equals k. */
static int avg_factors(const sc_window *w, int include_pad, int64_t n,
                       const int64_t *span, double *f) {
  int uniform = 1;
  for (int64_t o = span[0]; o < span[1]; o++) {
    const int64_t start = o * w->s - w->pad_lo;
    int64_t end = start + w->k;
    if (end > n + w->pad_hi) end = n + w->pad_hi;
    int64_t cnt;
    if (include_pad) {
      cnt = end - start;
    } else {
      const int64_t s0 = start < 0 ? 0 : start, e0 = end > n ? n : end;
      cnt = e0 - s0;
    }
    f[o - span[0]] = (double)cnt;
    if (cnt != w->k) uniform = 0;
  }
  return uniform;
}

/* Divisor map [1, 1, h, w] of ATen's average pooling for the output region
 * of instruction i, or NULL (*out) when the divisor is k_h * k_w throughout
 * (then avg_pool2d with zero explicit padding is already exact). */
static int avg_divisor(sc_run *r, int64_t i, AtenTensorHandle *out) {
  const sc_instr *in = &r->p->instr[i];
  const int64_t o = i + 1;
  const int64_t *rs = own(r, 0, o), *cs = own(r, 1, o);
  const int64_t h = rs[1] - rs[0], w = cs[1] - cs[0];
  int rc = SC_ERR;
  *out = NULL;
  if (in->divisor_override) return SC_OK;
  double *fr = malloc((size_t)(h + w) * sizeof *fr);
  if (!fr) return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  double *fc = fr + h;
  const int ur = avg_factors(&in->win[0], in->count_include_pad,
                             r->sizes[2 * in->in[0]], rs, fr);
  const int uc = avg_factors(&in->win[1], in->count_include_pad,
                             r->sizes[2 * in->in[0] + 1], cs, fc);
  if (ur && uc) {
    free(fr);
    return SC_OK;
  }
  const int64_t shape[4] = {1, 1, h, w}, strides[4] = {h * w, h * w, w, 1};
  const int32_t dtype = _sc_avg_map_dtype(r->ctx); /* float32 for halves */
  AtenTensorHandle host = NULL;
  void *data;
  if (aoti_torch_empty_strided(4, shape, strides, dtype,
                               aoti_torch_device_type_cpu(), 0, &host) ||
      aoti_torch_get_data_ptr(host, &data)) {
    _sc_oom(r->ctx, "a divisor map", 4, shape, dtype,
            aoti_torch_device_type_cpu());
    goto done;
  }
  for (int64_t y = 0; y < h; y++)
    for (int64_t x = 0; x < w; x++) {
      const double d = fr[y] * fc[x]; /* exact: integers below 2^24 */
      if (r->ctx->kdtype == SC_DTYPE_F64)
        ((double *)data)[y * w + x] = d;
      else
        ((float *)data)[y * w + x] = (float)d;
    }
  if (!r->ctx->is_cuda) {
    *out = host;
    host = NULL;
  } else if (_sc_empty_as(r->ctx, dtype, 4, shape, 0, out) ||
             _sc_copy_across(r->ctx, *out, host)) {
    _sc_drop(out);
    goto done;
  }
  rc = SC_OK;
done:
  _sc_drop(&host);
  free(fr);
  return rc;
}

/* Input of instruction i, slot j, over the span it reads: a view of the
 * input value where the span lies inside it, else a padded copy in the
 * value's layout (channels-last stays channels-last). With tiles_nhwc a
 * convolution of the image always gets a channels-last copy (cheap: few
 * channels), so the whole tile downstream runs channels-last. */
int _sc_layer_input(sc_run *r, int64_t i, int j, double pad_value,
                    AtenTensorHandle *out) {
  const sc_instr *in = &r->p->instr[i];
  const int64_t v = in->in[j];
  const int64_t *rd[2] = {readspan(r, 0, i, j), readspan(r, 1, i, j)};
  int64_t cl[2][2];
  int inside = 1, nonempty = 1;
  *out = NULL;
  for (int a = 0; a < 2; a++) {
    clip(rd[a], r->sizes[2 * v + a], cl[a]);
    if (cl[a][0] != rd[a][0] || cl[a][1] != rd[a][1]) inside = 0;
    if (empty(cl[a])) nonempty = 0;
  }
  AtenTensorHandle src = NULL;
  if (nonempty) {
    if (!r->val[v])
      return sc_fail(&r->ctx->err,
                     "streamcnn: internal error: value %lld not computed",
                     (long long)v);
    if (_sc_subview(r, r->val[v], region(r, 0, v), region(r, 1, v), cl[0],
                    cl[1], &src))
      return SC_ERR;
  }
  const int to_nhwc = v == 0 && in->op == SC_OP_CONV && r->ctx->tiles_nhwc &&
                      !(src && _sc_is_channels_last(r->ctx, src));
  if (inside && !to_nhwc) {
    *out = src;
    return SC_OK;
  }
  const int nhwc = to_nhwc || (src && _sc_is_channels_last(r->ctx, src));
  int rc = _sc_gather(r->ctx, src, r->batch, r->p->channels[v],
                      rd[0][1] - rd[0][0], rd[1][1] - rd[1][0],
                      cl[0][0] - rd[0][0], cl[1][0] - rd[1][0], pad_value, nhwc,
                      out);
  _sc_drop(&src);
  return rc;
}

/* A buffer of the shape (and the tiles' layout) _sc_layer_input would give,
 * contents undefined: the input of a convolution whose weight takes no
 * gradient, read by convolution_backward for its shape only (the value
 * itself was not kept, see _sc_keep_set). */
int _sc_layer_shape(sc_run *r, int64_t i, int j, AtenTensorHandle *out) {
  const int64_t v = r->p->instr[i].in[j];
  const int64_t *rd[2] = {readspan(r, 0, i, j), readspan(r, 1, i, j)};
  const int64_t sz[4] = {r->batch, r->p->channels[v], rd[0][1] - rd[0][0],
                         rd[1][1] - rd[1][0]};
  return _sc_tile_buffer(r->ctx, sz, 0, out);
}

/* Input value of a pointwise instruction restricted to the span the
 * instruction computes. */
int _sc_pointwise_input(sc_run *r, int64_t i, int j, AtenTensorHandle *out) {
  const int64_t v = r->p->instr[i].in[j], o = i + 1;
  return _sc_subview(r, r->val[v], region(r, 0, v), region(r, 1, v),
                     own(r, 0, o), own(r, 1, o), out);
}

/* New reference to value v (or its gradient) restricted to its own span. */
int _sc_own_view(sc_run *r, AtenTensorHandle t, int64_t v,
                 AtenTensorHandle *out) {
  return _sc_subview(r, t, region(r, 0, v), region(r, 1, v), own(r, 0, v),
                     own(r, 1, v), out);
}

/* Is value v held for the backward (keep = 1: a recompute for backward)? */
static int kept(const sc_run *r, int64_t v, int keep) {
  return keep && r->keep[v] && v >= r->keep_from;
}

/* May instruction i overwrite its input slot j in place? Only a value this
 * tile computed whole (not the caller's image, no halo from other tiles),
 * read by this instruction alone, over exactly the span the instruction
 * computes, and not needed by the backward. */
static int reusable(const sc_run *r, int64_t i, int j, int keep) {
  const int64_t v = r->p->instr[i].in[j], o = i + 1;
  if (v == 0 || r->p->n_consumers[v] != 1 || kept(r, v, keep) || !r->val[v])
    return 0;
  for (int a = 0; a < 2; a++)
    if (!same(region(r, a, v), own(r, a, o)) ||
        !same(region(r, a, v), own(r, a, v)))
      return 0;
  return 1;
}

static int affine_image(const sc_run *r) {
  return _sc_image_affine_shape(r->p) && r->fused[0] < 0 &&
         !(r->mask && r->mask[1 + r->p->instr[0].weight]);
}

/* Instruction 0 through the image gather (affine_image): the tile's own
 * span of value 1, normalised straight from the image's pixels. */
static int affine_image_forward(sc_run *r, AtenTensorHandle *y) {
  const sc_instr *in = &r->p->instr[0];
  AtenTensorHandle src = NULL;
  *y = NULL;
  if (_sc_subview(r, r->val[0], region(r, 0, 0), region(r, 1, 0),
                  readspan(r, 0, 0, 0), readspan(r, 1, 0, 0), &src))
    return SC_ERR;
  const int nhwc = r->ctx->tiles_nhwc || _sc_is_channels_last(r->ctx, src);
  int rc = _sc_gather_affine(r->ctx, src, r->batch, in->c_in, nhwc,
                             param(r, in->weight),
                             in->bias >= 0 ? param(r, in->bias) : NULL, y);
  _sc_drop(&src);
  if (!rc) _sc_count_macs(*y, 1.0);
  if (!rc && r->host_direct) rc = _sc_mark_host_reads(r);
  return rc;
}

/* Replace the tile's image view r->val[0] with a dense copy in the
 * computation's dtype (a uint8 image normalised by the gather), NHWC or
 * NCHW. */
static int copy_image_tile(sc_run *r, int nhwc) {
  AtenTensorHandle px = r->val[0];
  const int64_t *rh = region(r, 0, 0), *rw = region(r, 1, 0);
  r->val[0] = NULL;
  const int rc = _sc_gather(r->ctx, px, r->batch, r->p->channels[0],
                            rh[1] - rh[0], rw[1] - rw[0], 0, 0, 0.0, nhwc,
                            &r->val[0]);
  _sc_drop(&px);
  return rc;
}

/* Run instruction i on the current tile; keep: store what backward needs. */
static int forward_instr(sc_run *r, int64_t i, int keep) {
  const sc_instr *in = &r->p->instr[i];
  sc_ctx *ctx = r->ctx;
  AtenTensorHandle x = NULL, y = NULL, aux = NULL, t = NULL;
  int rc = SC_ERR;
  switch (in->op) {
  case SC_OP_CONV: {
    const int f = r->fused[i] >= 0; /* with its batch norm folded in */
    if (i == 0 && affine_image(r)) {
      if (affine_image_forward(r, &y)) goto done;
      break;
    }
    if (i == 0 && r->ctx->affine_f32) {
      sc_fail(&ctx->err,
              "streamcnn: params[%lld] (weight of instruction 0, conv) is "
              "float32 in a %s computation: a float32 per-channel map of "
              "the image (mean / std) is applied only while its weight "
              "takes no gradient",
              (long long)in->weight,
              ctx->kdtype == SC_DTYPE_F16 ? "float16" : "bfloat16");
      goto done;
    }
    if (_sc_layer_input(r, i, 0, 0.0, &x) ||
        _sc_conv(ctx, x, f ? r->fold[4 * i] : param(r, in->weight),
                 f ? r->fold[4 * i + 1] : param(r, in->bias), in, &y))
      goto done;
    break;
  }
  case SC_OP_MAXPOOL:
    /* NB: max pooling pads with -inf, not 0. No indices: the backward
     * takes them again from the input it keeps anyway (int64 indices are
     * twice a float32 output, held from the recompute to the backward) */
    if (_sc_layer_input(r, i, 0, -INFINITY, &x) ||
        _sc_maxpool(ctx, x, in, &y, NULL))
      goto done;
    break;
  case SC_OP_AVGPOOL:
    if (_sc_layer_input(r, i, 0, 0.0, &x) || avg_divisor(r, i, &aux)) goto done;
    if (!aux) {
      if (_sc_avgpool(ctx, x, in, in->divisor_override, &y)) goto done;
    } else if (_sc_avgpool_div(ctx, x, in, aux, &y)) { /* ATen's divisors */
      goto done;
    }
    if (!keep) _sc_drop(&aux);
    break;
  case SC_OP_BATCHNORM: {
    AtenTensorHandle p4[4] = {param(r, in->bn_weight), param(r, in->bn_bias),
                              param(r, in->bn_mean), param(r, in->bn_var)};
    if (r->fused[i] >= 0) { /* the convolution applied it */
      if (_sc_pointwise_input(r, i, 0, &y)) goto done;
      break;
    }
    if (_sc_pointwise_input(r, i, 0, &x) ||
        _sc_batchnorm(ctx, x, p4, in->eps, &y))
      goto done;
    break;
  }
  case SC_OP_LAYERNORM_C:
    if (_sc_pointwise_input(r, i, 0, &x) ||
        _sc_layernorm_c(ctx, x, param(r, in->weight), param(r, in->bias),
                        in->eps, &y))
      goto done;
    break;
  case SC_OP_LINEAR_C:
    if (_sc_pointwise_input(r, i, 0, &x) ||
        _sc_linear_c(ctx, x, param(r, in->weight), param(r, in->bias), &y))
      goto done;
    break;
  case SC_OP_SCALE_C:
    if (_sc_pointwise_input(r, i, 0, &x) ||
        _sc_scale_c(ctx, x, param(r, in->weight), &y))
      goto done;
    break;
  case SC_OP_ACT:
    if (in->act == SC_ACT_RELU && _sc_has_halo(r, i + 1)) {
      /* straight into the region-sized buffer _sc_add_halo completes: no
       * in-place pass and copy */
      if (_sc_pointwise_input(r, i, 0, &x) ||
          _sc_halo_buffer(r, i + 1, &y, &t) || _sc_relu_into(ctx, x, t))
        goto done;
      break;
    }
    if (in->act == SC_ACT_RELU && reusable(r, i, 0, keep)) {
      if (_sc_relu_(ctx, r->val[in->in[0]], &y)) goto done;
      break;
    }
    if (_sc_pointwise_input(r, i, 0, &x) || _sc_act(ctx, in, x, &y)) goto done;
    break;
  case SC_OP_ADD: {
    AtenTensorHandle b = NULL;
    if (reusable(r, i, 0, keep) || reusable(r, i, 1, keep)) {
      /* accumulate into the input nothing else reads: no new buffer */
      const int j = reusable(r, i, 0, keep) ? 0 : 1;
      rc = _sc_pointwise_input(r, i, 1 - j, &b) ||
           _sc_copy(ctx, r->val[in->in[j]], b, 1) ||
           aoti_torch_new_tensor_handle(r->val[in->in[j]], &y);
    } else {
      rc = _sc_pointwise_input(r, i, 0, &x) ||
           _sc_pointwise_input(r, i, 1, &b) || _sc_add(ctx, x, b, &y);
    }
    _sc_drop(&b);
    if (rc) goto done;
    break;
  }
  case SC_OP_CAT: { /* a new tile buffer: the channels of a, then of b */
    const int64_t ca = r->p->channels[in->in[0]];
    AtenTensorHandle src[2] = {NULL, NULL}, part = NULL;
    rc = _sc_pointwise_input(r, i, 0, &src[0]) ||
         _sc_pointwise_input(r, i, 1, &src[1]);
    if (!rc) {
      const int64_t *rs = own(r, 0, i + 1), *cs = own(r, 1, i + 1);
      const int64_t shape[4] = {r->batch, in->c_out, rs[1] - rs[0],
                                cs[1] - cs[0]};
      rc = _sc_tile_buffer(ctx, shape, 0, &y);
    }
    for (int j = 0; j < 2 && !rc; j++) {
      rc = _sc_channel_view(ctx, y, j ? ca : 0, j ? in->c_out - ca : ca,
                            &part) ||
           _sc_copy(ctx, part, src[j], 0);
      _sc_drop(&part);
    }
    _sc_drop(&src[0]);
    _sc_drop(&src[1]);
    if (rc) goto done;
    break;
  }
  case SC_OP_CHANNELS: { /* a new tile buffer: the channels it selects */
    if (_sc_pointwise_input(r, i, 0, &x)) goto done;
    const int64_t *rs = own(r, 0, i + 1), *cs = own(r, 1, i + 1);
    const int64_t shape[4] = {r->batch, in->c_out, rs[1] - rs[0],
                              cs[1] - cs[0]};
    if (_sc_tile_buffer(ctx, shape, 0, &y) ||
        _sc_channel_map(ctx, in, y, x, 0))
      goto done;
    break;
  }
  default:
    sc_fail(&ctx->err, "streamcnn: internal error: opcode %d", in->op);
    goto done;
  }
  r->val[i + 1] = y;
  y = NULL;
  if (keep && i >= r->keep_from) { /* avg-pool divisor map, for this
                                       layer's backward */
    r->aux[i] = aux;
    aux = NULL;
  }
  rc = SC_OK;
done:
  _sc_drop(&x);
  _sc_drop(&y);
  _sc_drop(&aux);
  _sc_drop(&t);
  return rc;
}

/* Forward of the current tile's cone. Each value is freed once its last
 * consumer ran, unless keep = 1 and a backward op reads it (r->keep). */
int _sc_forward_tile(sc_run *r, int keep) {
  const sc_program *p = r->p;
  const int64_t out_v = p->n_instr;
  if (!value_empty(r, 0)) {
    if (_sc_subview(r, r->call->image, r->img_rows,
                    (const int64_t[2]){0, r->sizes[1]}, region(r, 0, 0),
                    region(r, 1, 0), &r->val[0]))
      return SC_ERR;
    if (r->ctx->image_host && _sc_host_tile(r)) return SC_ERR;
    if (affine_image(r)) {
      /* instruction 0 reads the pixels themselves */
    } else if (r->ctx->image_u8 || r->ctx->image_host) { /* pixels -> tile */
      if (copy_image_tile(r, r->ctx->tiles_nhwc)) return SC_ERR;
      if (r->host_direct && _sc_mark_host_reads(r)) return SC_ERR;
    } else if (r->nhwc_image && !_sc_is_channels_last(r->ctx, r->val[0])) {
      /* a pool or pointwise op of the image keeps its layout: a
       * channels-last copy keeps the tile channels-last (a convolution of
       * the image takes a channels-last copy anyway, _sc_layer_input); in
       * NCHW oneDNN pads few channels to blocks of 16 in its copies */
      if (copy_image_tile(r, 1)) return SC_ERR;
    }
  }
  for (int64_t v = 0; v < r->nv; v++) r->left[v] = p->n_consumers[v];
  for (int64_t i = 0; i < p->n_instr; i++) {
    if (value_empty(r, i + 1)) continue; /* only padding reads it */
    if (!empty(own(r, 0, i + 1)) && !empty(own(r, 1, i + 1)) &&
        forward_instr(r, i, keep))
      return SC_ERR;
    if (r->cached && (_sc_add_halo(r, i + 1) || _sc_save_halo(r, i + 1)))
      return SC_ERR;
    const sc_instr *in = &p->instr[i];
    for (int j = 0; j < in->n_in; j++) {
      const int64_t v = in->in[j];
      if (--r->left[v] == 0 && v != out_v && !kept(r, v, keep))
        _sc_drop(&r->val[v]);
    }
  }
  return SC_OK;
}

/* Forward of the current tile into the stem output out. */
int _sc_forward_into(sc_run *r, AtenTensorHandle out) {
  const int64_t ov = r->p->n_instr;
  const int64_t *rs = own(r, 0, ov), *cs = own(r, 1, ov);
  AtenTensorHandle dst = NULL;
  int rc = _sc_forward_tile(r, 0);
  if (!rc && !empty(rs) && !empty(cs))
    rc = _sc_view(r->ctx, out, rs[0] - r->out_row0, rs[1] - rs[0], cs[0],
                  cs[1] - cs[0], &dst) || /* out starts at out_row0 */
         _sc_copy(r->ctx, dst, r->val[ov], 0);
  _sc_drop(&dst);
  _sc_run_tile_release(r);
  return rc;
}
