/*
 * replay.c — run the program tile by tile, forward and backward: the set-up
 * of a call (run_init: value extents, tilings and plans, the strips'
 * layout, folded batch norms, the tile order) and the two drivers.
 *
 * Forward (_sc_forward): always with halo caching, row by row, left to
 * right, halos carried along (halo.c), each tile's part of the stem
 * output copied into it (forward.c). Backward (_sc_backward): checks
 * grad_output (and the strips), decides what carries a gradient and what
 * the recompute keeps (analysis.c), then runs the tiles, cached in the
 * forward's order reversed with the pending halo gradients, else largest
 * first (backward.c; sparse.c skips the tiles without a non-zero gradient
 * and back-propagates sparse ones in boxes); finally the folded gradients
 * (fold.c) and the hand over of the requested gradients, zeros where
 * nothing contributed.
 *
 * The rooms and their call order: op/README.md. Calls every room below;
 * called by register.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdlib.h>

/* The plans of the tiles along one axis, between _sc_tile_bounds's
 * bounds (the first of the plans serves as their scratch). */
static int plan_axis_tiles(sc_run *r, int a, int64_t tile_in) {
  const sc_program *p = r->p;
  sc_error *err = &r->ctx->err;
  /* output rows of a band (tile-parallel), else the whole extent */
  const int band = a == 0 && r->call->banded;
  const int64_t lo = band ? r->call->rows[0] : 0;
  const int64_t hi = band ? r->call->rows[1] : r->sizes[2 * p->n_instr + a];
  const int64_t n = hi - lo;
  r->n_tiles[a] = (n + r->tile_out[a] - 1) / r->tile_out[a];
  r->plans[a] = calloc((size_t)r->n_tiles[a], sizeof *r->plans[a]);
  int64_t *bounds = malloc((size_t)(r->n_tiles[a] + 1) * sizeof *bounds);
  int rc = !r->plans[a] || !bounds;
  for (int64_t t = 0; !rc && t < r->n_tiles[a]; t++)
    rc = !(r->plans[a][t] = sc_axis_plan_new(p));
  if (rc) {
    free(bounds);
    return sc_fail(err, "streamcnn: out of memory");
  }
  rc = _sc_tile_bounds_range(p, r->sizes, a, lo, hi, r->tile_out[a], tile_in,
                             r->cached, r->plans[a][0], bounds, err);
  for (int64_t t = 0; !rc && t < r->n_tiles[a]; t++)
    rc = r->cached ? _sc_plan_axis_cached_from(p, r->sizes, a, lo, bounds[t],
                                               bounds[t + 1], r->plans[a][t],
                                               err)
                   : sc_plan_axis(p, r->sizes, a, bounds[t], bounds[t + 1],
                                  r->plans[a][t], err);
  free(bounds);
  return rc;
}

/* Whether an instruction other than a convolution reads the image. */
static int image_read_by_non_conv(const sc_program *p) {
  for (int64_t i = 0; i < p->n_instr; i++)
    for (int j = 0; j < p->instr[i].n_in; j++)
      if (p->instr[i].in[j] == 0 && p->instr[i].op != SC_OP_CONV) return 1;
  return 0;
}

static int run_init(sc_run *r, sc_ctx *ctx, const sc_call *call) {
  const sc_program *p = call->prog;
  int64_t dim, *isz, *ist;
  memset(r, 0, sizeof *r);
  r->ctx = ctx;
  r->call = call;
  r->p = p;
  r->nv = p->n_instr + 1;
  if (_sc_meta(ctx, call->image, &dim, &isz, &ist)) return SC_ERR;
  r->batch = isz[0];
  r->sizes = calloc(2 * (size_t)r->nv, sizeof *r->sizes);
  r->val = calloc((size_t)r->nv, sizeof *r->val);
  r->grad = calloc((size_t)r->nv, sizeof *r->grad);
  r->grad_mine = calloc((size_t)r->nv, 1);
  r->keep = calloc((size_t)r->nv, 1);
  r->aux = calloc((size_t)p->n_instr, sizeof *r->aux);
  r->left = calloc((size_t)r->nv, sizeof *r->left);
  r->needs = calloc((size_t)r->nv, 1);
  r->pgrad = calloc((size_t)p->n_params + 1, sizeof *r->pgrad);
  r->fused = calloc((size_t)p->n_instr + 1, sizeof *r->fused);
  r->fold = calloc(4 * (size_t)p->n_instr + 1, sizeof *r->fold);
  r->fsum = calloc(2 * (size_t)p->n_instr + 1, sizeof *r->fsum);
  r->cached = call->cached;
  r->next_tile[0] = r->next_tile[1] = -1;
  AtenTensorHandle **arrays[] = HALO_ARRAYS(r);
  int have = 1;
  for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++)
    have &= (*arrays[k] = calloc((size_t)r->nv, sizeof **arrays[k])) != NULL;
  if (!r->sizes || !r->val || !r->grad || !r->grad_mine || !r->keep ||
      !r->aux || !r->left || !r->needs || !r->pgrad || !r->fused ||
      !r->fold || !r->fsum || !have)
    return sc_fail(&ctx->err, "streamcnn: out of memory");
  if (_sc_fold_init(r)) return SC_ERR;
  /* a band: the image tensor holds rows [rows[2], rows[2] + isz[2]) of an
   * image of rows[3] rows (validated in register.c) */
  const int64_t full_h = call->banded ? call->rows[3] : isz[2];
  r->img_rows[0] = call->banded ? call->rows[2] : 0;
  r->img_rows[1] = r->img_rows[0] + isz[2];
  if (sc_value_sizes(p, full_h, isz[3], r->sizes, &ctx->err) ||
      _sc_tiling(p, r->sizes, call->tile[0], call->tile[1], r->tile_out,
                 &ctx->err))
    return SC_ERR;
  const int64_t out_h = r->sizes[2 * p->n_instr];
  if (call->banded &&
      (call->rows[0] < 0 || call->rows[1] <= call->rows[0] ||
       call->rows[1] > out_h))
    return sc_fail(&ctx->err,
                   "streamcnn: rows [%lld, %lld) is not a non-empty range of "
                   "the stem output's %lld rows (image of %lld rows)",
                   (long long)call->rows[0], (long long)call->rows[1],
                   (long long)out_h, (long long)full_h);
  r->out_row0 = call->banded ? call->rows[0] : 0;
  for (int a = 0; a < 2; a++)
    if (plan_axis_tiles(r, a, call->tile[a])) return SC_ERR;
  if (call->banded) { /* the image rows the band reads must be at hand */
    int64_t read[2] = {0, 0}; /* their hull over the tiles (none: rows of
                                 padding alone) */
    for (int64_t t = 0; t < r->n_tiles[0]; t++) {
      const int64_t *rg = r->plans[0][t]->region;
      if (rg[1] <= rg[0]) continue;
      if (read[1] <= read[0] || rg[0] < read[0]) read[0] = rg[0];
      if (rg[1] > read[1]) read[1] = rg[1];
    }
    if (read[1] > read[0] &&
        (read[0] < r->img_rows[0] || read[1] > r->img_rows[1]))
      return sc_fail(&ctx->err,
                     "streamcnn: output rows [%lld, %lld) read image rows "
                     "[%lld, %lld), but the image tensor holds rows [%lld, "
                     "%lld) of %lld (streamcnn.band_info says which)",
                     (long long)call->rows[0], (long long)call->rows[1],
                     (long long)read[0], (long long)read[1],
                     (long long)r->img_rows[0], (long long)r->img_rows[1],
                     (long long)full_h);
  }
  if (r->cached && _sc_plan_strips(r)) return SC_ERR;
#ifdef SC_WITH_CUDA
  if (ctx->image_host) { /* prefetch_issue skips layouts no 2-D copy reads */
    void *ptr = NULL;
    r->img_pinned = !aoti_torch_get_data_ptr(call->image, &ptr) && ptr &&
                    sc_cuda_host_mapped(ptr);
  }
#endif
  r->nhwc_image = ctx->tiles_nhwc && image_read_by_non_conv(p);
  r->n_order = r->n_tiles[0] * r->n_tiles[1];
  return r->cached ? SC_OK : _sc_order_tiles(r); /* cached: a fixed sweep */
}

int _sc_forward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle *out,
                AtenTensorHandle *strips) {
  sc_run r;
  *out = NULL;
  if (strips) *strips = NULL;
  sc_call cached_call = *call; /* the forward always caches halos */
  cached_call.cached = 1;
  int rc = run_init(&r, ctx, &cached_call);
  const int64_t ov = call->prog->n_instr;
  if (!rc) {
    const int64_t rows = call->banded ? call->rows[1] - call->rows[0]
                                      : r.sizes[2 * ov];
    const int64_t shape[4] = {r.batch, call->prog->channels[ov], rows,
                              r.sizes[2 * ov + 1]};
    rc = _sc_alloc(ctx, "the stem output", ctx->dtype, 4, shape, 0, out);
  }
  if (!rc && strips) { /* the halos the backward will need, all of them */
    const int64_t n[1] = {r.strip_total};
    rc = _sc_empty(ctx, 1, n, strips);
    r.strips = *strips;
  }
  if (!rc) _sc_release_free_pages(ctx);
  /* row by row, left to right, halos carried along */
  r.sweep = 1;
  int64_t k = 0;
  for (int64_t t = 0; !rc && t < r.n_tiles[0]; t++) {
    _sc_move_all(r.band, r.band_next, r.nv);
    for (int64_t c = 0; !rc && c < r.n_tiles[1]; c++) {
      _sc_move_all(r.lhalo, r.lnext, r.nv);
      _sc_select_cached(&r, t, c);
      r.next_tile[0] = c + 1 < r.n_tiles[1] ? t : t + 1;
      r.next_tile[1] = c + 1 < r.n_tiles[1] ? c + 1 : 0;
      if (r.next_tile[0] >= r.n_tiles[0]) r.next_tile[0] = -1;
      rc = _sc_forward_into(&r, *out);
      if (!rc) _sc_report(0, ++k, r.n_order);
    }
    _sc_drop_all(r.lhalo, r.nv);
    _sc_drop_all(r.lnext, r.nv);
  }
  if (rc) {
    _sc_drop(out);
    if (strips) _sc_drop(strips);
  }
  _sc_run_release(&r);
  return rc;
}

static int zeros_like(sc_ctx *ctx, AtenTensorHandle t, AtenTensorHandle *out) {
  int64_t dim, *sz, *st, strides[8];
  int32_t dtype, dt, di;
  *out = NULL;
  if (_sc_describe(ctx, t, "a parameter", &dim, &sz, &st, &dtype, &dt, &di))
    return SC_ERR;
  if (dim > 8)
    return sc_fail(&ctx->err, "streamcnn: cannot read a parameter");
  int64_t acc = 1;
  for (int64_t i = dim - 1; i >= 0; i--) {
    strides[i] = acc;
    acc *= sz[i] > 1 ? sz[i] : 1;
  }
  if (aoti_torch_empty_strided(dim, sz, strides, dtype, dt, di, out) ||
      aoti_torch_zero_(*out)) {
    _sc_drop(out);
    return _sc_oom(ctx, "a parameter gradient", dim, sz, dtype, dt);
  }
  return SC_OK;
}

int _sc_backward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle grad_out,
                 const int *mask, AtenTensorHandle *grads) {
  const sc_program *p = call->prog;
  const int64_t ov = p->n_instr;
  sc_run r;
  for (int64_t k = 0; k <= p->n_params; k++) grads[k] = NULL;
  int rc = run_init(&r, ctx, call);
  r.mask = mask;
  if (!rc && mask[0] && ctx->image_u8)
    rc = sc_fail(&ctx->err, "streamcnn: a uint8 image has no gradient "
                            "(output_mask[0] must be false)");
  if (!rc && mask[0] && ctx->image_host)
    rc = sc_fail(&ctx->err, "streamcnn: an image in host memory streamed to "
                            "the device has no gradient (output_mask[0] must "
                            "be false); move it to the device to "
                            "differentiate it");
  if (!rc) { /* check grad_output against the forward's output */
    int64_t dim, *sz, *st;
    int32_t dtype, dt, di;
    const int64_t want[4] = {r.batch, p->channels[ov],
                             call->banded ? call->rows[1] - call->rows[0]
                                          : r.sizes[2 * ov],
                             r.sizes[2 * ov + 1]};
    rc = _sc_describe(ctx, grad_out, "grad_output", &dim, &sz, &st, &dtype, &dt,
                      &di);
    if (!rc && (dim != 4 || sz[0] != want[0] || sz[1] != want[1] ||
                sz[2] != want[2] || sz[3] != want[3]))
      rc = sc_fail(&ctx->err,
                   "streamcnn: grad_output must have the stem output's shape "
                   "[%lld, %lld, %lld, %lld]",
                   (long long)want[0], (long long)want[1], (long long)want[2],
                   (long long)want[3]);
    else if (!rc && !_sc_on_compute(ctx, dtype, dt, di))
      rc = sc_fail(&ctx->err,
                   "streamcnn: grad_output must have the image's dtype and "
                   "device");
  }
  int sparse = SC_SPARSE_OFF; /* tiles without non-zeros: sparse.c */
  if (!rc) rc = _sc_sparse_mode(ctx, &sparse);
  if (!rc) {
    _sc_needs(p, mask, r.fused, r.needs);
    _sc_keep_set(p, r.needs, mask, r.fused, r.keep);
    if (!r.cached) _sc_choose_cut(&r);
  }
  if (!rc && mask[0]) {
    int64_t dim, *sz, *st;
    rc = _sc_meta(ctx, call->image, &dim, &sz, &st) ||
         _sc_alloc(ctx, "the image's gradient", ctx->dtype, 4, sz, 1, &r.igrad);
  }
  if (!rc && r.needs[ov] && r.batch > 0) _sc_release_free_pages(ctx);
  if (!rc && r.cached) { /* halos of the forward are the strips */
    int64_t dim, *sz, *st;
    int32_t dtype, dt, di;
    AtenTensorHandle s = call->strips;
    if (!s ||
        _sc_describe(ctx, s, "strips", &dim, &sz, &st, &dtype, &dt, &di) ||
        dim != 1 || sz[0] != r.strip_total || (sz[0] > 0 && st[0] != 1) ||
        !_sc_on_compute(ctx, dtype, dt, di))
      rc = sc_fail(&ctx->err,
                   "streamcnn: strips must be the second output of "
                   "forward_cached for this image, params, program and "
                   "tile_size (a 1-D tensor of %lld elements of the compute "
                   "dtype, on the image's device)",
                   (long long)r.strip_total);
    r.strips = s;
  }
  if (!rc && r.cached && r.needs[ov] && r.batch > 0) {
    /* the forward's order reversed: each tile takes its halo from the
     * strips and passes the halo's gradient on (_sc_pass_pending) */
    int64_t k = 0;
    const int64_t nc = r.n_tiles[1];
    for (int64_t t = r.n_tiles[0] - 1; !rc && t >= 0; t--) {
      for (int64_t c = nc - 1; !rc && c >= 0; c--) {
        _sc_select_cached(&r, t, c);
        r.next_tile[0] = c > 0 ? t : t - 1; /* -1 after the last */
        r.next_tile[1] = c > 0 ? c - 1 : nc - 1;
        int how = SC_TILE_WHOLE;
        rc = _sc_sparse_tile(&r, grad_out, sparse, &how);
        if (!rc && how == SC_TILE_WHOLE)
          rc = _sc_halo_views(&r) || _sc_backward_tile(&r, grad_out);
        _sc_run_tile_release(&r);
        _sc_drop_all(r.band, r.nv);
        _sc_drop_all(r.lhalo, r.nv);
        if (!rc) _sc_report(1, ++k, r.n_order);
      }
      _sc_drop_all(r.gleft, r.nv);
      _sc_move_all(r.gband, r.gband_up, r.nv);
    }
  } else if (!rc && r.needs[ov] && r.batch > 0)
    for (int64_t k = 0; !rc && k < r.n_order; k++) {
      _sc_select_tile(&r, k);
      /* the tile whose pixels a pinned host image prefetches meanwhile */
      r.next_tile[0] = k + 1 < r.n_order ? r.order[k + 1] / r.n_tiles[1] : -1;
      r.next_tile[1] = k + 1 < r.n_order ? r.order[k + 1] % r.n_tiles[1] : 0;
      int how = SC_TILE_WHOLE;
      rc = _sc_sparse_tile(&r, grad_out, sparse, &how);
      if (!rc && how == SC_TILE_WHOLE) rc = _sc_backward_tile(&r, grad_out);
      _sc_run_tile_release(&r);
      if (!rc) _sc_report(1, k + 1, r.n_order);
    }
  if (!rc) rc = _sc_fold_grads_finish(&r);
  /* hand over the requested gradients, contiguous, zeros where unused */
  if (!rc && mask[0]) {
    grads[0] = r.igrad;
    r.igrad = NULL;
  }
  for (int64_t k = 0; !rc && k < p->n_params; k++) {
    if (!mask[1 + k]) continue;
    int32_t pd = 0, gd = 0;
    if (r.pgrad[k] && (aoti_torch_get_dtype(call->params[k], &pd) ||
                       aoti_torch_get_dtype(r.pgrad[k], &gd))) {
      rc = sc_fail(&ctx->err, "streamcnn: cannot read params[%lld]",
                   (long long)k);
    } else if (r.pgrad[k] && pd != gd) { /* float32 sum -> the dtype */
      int64_t dim, *sz, *st;
      rc = _sc_meta(ctx, r.pgrad[k], &dim, &sz, &st) ||
           _sc_empty_as(ctx, pd, dim, sz, 0, &grads[1 + k]) ||
           _sc_copy(ctx, grads[1 + k], r.pgrad[k], 0);
    } else if (r.pgrad[k]) {
      grads[1 + k] = r.pgrad[k];
      r.pgrad[k] = NULL;
      rc = _sc_make_contiguous(ctx, &grads[1 + k]);
    } else {
      rc = zeros_like(ctx, call->params[k], &grads[1 + k]);
    }
  }
  if (rc)
    for (int64_t k = 0; k <= p->n_params; k++) _sc_drop(&grads[k]);
  _sc_run_release(&r);
  return rc;
}
