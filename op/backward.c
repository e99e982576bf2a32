/*
 * backward.c — the backward of one tile. By linearity the gradient of the
 * loss is the sum over output tiles of each tile's output gradient pushed
 * back through its own cone: each tile recomputes its cone's forward
 * (keeping what the backward ops need, _sc_keep_set), back-propagates
 * through ATen's backward ops, and its layers add their input gradients
 * into the values below (run.c), the image's gradient and the parameter
 * sums. Where the program has a cut (_sc_choose_cut: dense early values,
 * as a ResNet's conv1 .. relu) the part below it runs in row pieces of
 * their own, smaller cones.
 *
 * Owns: the per-instruction backward, the cut and the pieces.
 * Calls: run.c, halo.c (pending gradients), forward.c (recompute, inputs),
 * fold.c (folded convolutions). Called by replay.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <math.h>
#include <stdlib.h>

static int backward_instr(sc_run *r, int64_t i) {
  const sc_instr *in = &r->p->instr[i];
  sc_ctx *ctx = r->ctx;
  const int64_t o = i + 1;
  AtenTensorHandle g = NULL, y = NULL, x = NULL, gi = NULL, t = NULL;
  AtenTensorHandle res[3] = {NULL, NULL, NULL};
  const int need_in = r->needs[in->in[0]];
  int rc = SC_ERR;
  /* the gradient and the output over the span this tile computed */
  if (_sc_own_view(r, r->grad[o], o, &g) ||
      (r->val[o] && _sc_own_view(r, r->val[o], o, &y)))
    goto done;
  switch (in->op) {
  case SC_OP_CONV: {
    if (r->fused[i] >= 0) {
      if (_sc_fused_conv_backward(r, i, g)) goto done;
      break;
    }
    const int m[3] = {need_in, _sc_conv_wgrad(r->p, r->mask, r->fused, i),
                      wants(r, in->bias)};
    if (!m[0] && !m[1] && !m[2]) break;
    /* the padded input is rebuilt rather than held through the forward;
     * the input's gradient alone needs only its shape */
    if ((m[1] ? _sc_layer_input(r, i, 0, 0.0, &x)
              : _sc_layer_shape(r, i, 0, &x)) ||
        _sc_conv_backward(ctx, g, x, param(r, in->weight), in, m, res) ||
        (m[1] && _sc_accum_param(r, in->weight, &res[1])) ||
        (m[2] && _sc_accum_param(r, in->bias, &res[2])) ||
        (m[0] && _sc_accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_MAXPOOL: /* the indices again, from the kept input */
    if (need_in && (_sc_layer_input(r, i, 0, -INFINITY, &x) ||
                    _sc_maxpool(ctx, x, in, &t, &res[0]) ||
                    _sc_maxpool_backward(ctx, g, x, in, res[0], &gi) ||
                    _sc_accum_input(r, i, 0, gi, 1)))
      goto done;
    break;
  case SC_OP_AVGPOOL:
    if (!need_in) break;
    if (_sc_layer_input(r, i, 0, 0.0, &x)) goto done;
    if (r->aux[i]) { /* forward divided window sums by the divisor map */
      if (_sc_avgpool_div_backward(ctx, g, x, in, r->aux[i], &gi)) goto done;
    } else if (_sc_avgpool_backward(ctx, g, x, in, in->divisor_override,
                                    &gi)) {
      goto done;
    }
    if (_sc_accum_input(r, i, 0, gi, 1)) goto done;
    break;
  case SC_OP_BATCHNORM: {
    if (r->fused[i] >= 0) { /* the convolution's backward does its part */
      if (need_in && _sc_accum_input(r, i, 0, g, r->grad_mine[o])) goto done;
      break;
    }
    const int m[3] = {need_in, wants(r, in->bn_weight),
                      wants(r, in->bn_bias)};
    AtenTensorHandle p4[4] = {param(r, in->bn_weight), param(r, in->bn_bias),
                              param(r, in->bn_mean), param(r, in->bn_var)};
    if (!m[0] && !m[1] && !m[2]) break;
    if ((m[1] && _sc_pointwise_input(r, i, 0, &x)) || /* x: the weight's only */
        _sc_batchnorm_backward(ctx, g, x, p4, in->eps, m, res) ||
        (m[1] && _sc_accum_param(r, in->bn_weight, &res[1])) ||
        (m[2] && _sc_accum_param(r, in->bn_bias, &res[2])) ||
        (m[0] && _sc_accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_LAYERNORM_C:
  case SC_OP_LINEAR_C: {
    const int m[3] = {need_in, wants(r, in->weight), wants(r, in->bias)};
    if (!m[0] && !m[1] && !m[2]) break;
    if ((in->op == SC_OP_LAYERNORM_C || m[1]) &&
        _sc_pointwise_input(r, i, 0, &x))
      goto done;
    if ((in->op == SC_OP_LAYERNORM_C
             ? _sc_layernorm_c_backward(ctx, g, x, param(r, in->weight),
                                        param(r, in->bias), in->eps, m, res)
             : _sc_linear_c_backward(ctx, g, x, param(r, in->weight), m,
                                     res)) ||
        (m[1] && _sc_accum_param(r, in->weight, &res[1])) ||
        (m[2] && _sc_accum_param(r, in->bias, &res[2])) ||
        (m[0] && _sc_accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_SCALE_C: {
    const int m[2] = {need_in, wants(r, in->weight)};
    if (!m[0] && !m[1]) break;
    if ((m[1] && _sc_pointwise_input(r, i, 0, &x)) ||
        _sc_scale_c_backward(ctx, g, x, param(r, in->weight), m, res) ||
        (m[1] && _sc_accum_param(r, in->weight, &res[1])) ||
        (m[0] && _sc_accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_ACT:
    if (!need_in) break;
    if (in->act == SC_ACT_RELU && r->grad_mine[o]) { /* in place on g */
      if (_sc_relu_backward_(ctx, g, y) || _sc_accum_input(r, i, 0, g, 1))
        goto done;
      break;
    }
    if (!_sc_act_uses_output(in->act) && _sc_pointwise_input(r, i, 0, &x))
      goto done;
    if (_sc_act_backward(ctx, in, g, x, y, &gi) ||
        _sc_accum_input(r, i, 0, gi, 1))
      goto done;
    break;
  case SC_OP_ADD: {
    /* the same gradient flows to both inputs: the first taker may adopt
     * it, the second (or a taker when it is not ours) copies */
    int mine = r->grad_mine[o];
    for (int j = 0; j < 2; j++) {
      if (!r->needs[in->in[j]]) continue;
      if (_sc_accum_input(r, i, j, g, mine)) goto done;
      mine = 0;
    }
    break;
  }
  case SC_OP_CAT: { /* each input takes its channels of the gradient */
    const int64_t ca = r->p->channels[in->in[0]];
    for (int j = 0; j < 2; j++) {
      if (!r->needs[in->in[j]]) continue;
      if (_sc_channel_view(ctx, g, j ? ca : 0, j ? in->c_out - ca : ca, &gi) ||
          _sc_accum_input(r, i, j, gi, 0))
        goto done;
      _sc_drop(&gi);
    }
    break;
  }
  case SC_OP_CHANNELS: { /* the gradient's channels back where they came
                            from, zeros elsewhere */
    if (!need_in) break;
    int64_t dim, *sz, *st;
    if (_sc_meta(ctx, g, &dim, &sz, &st)) goto done;
    const int64_t shape[4] = {sz[0], r->p->channels[in->in[0]], sz[2], sz[3]};
    if (_sc_tile_buffer(ctx, shape, 1, &gi) ||
        _sc_channel_map(ctx, in, g, gi, 1) || _sc_accum_input(r, i, 0, gi, 1))
      goto done;
    break;
  }
  default:
    sc_fail(&ctx->err, "streamcnn: internal error: opcode %d", in->op);
    goto done;
  }
  rc = SC_OK;
done:
  _sc_drop(&g);
  _sc_drop(&y);
  _sc_drop(&x);
  _sc_drop(&gi);
  _sc_drop(&t);
  for (int k = 0; k < 3; k++) _sc_drop(&res[k]);
  return rc;
}

/* Backward of instructions top-1 down to stop (their outputs top .. stop+1),
 * starting from r->grad[top]; frees each value once its producer is done. */
static int backward_range(sc_run *r, int64_t top, int64_t stop) {
  for (int64_t i = top - 1; i >= stop; i--) {
    const int64_t o = i + 1;
    if (r->cached && _sc_pass_pending(r, o)) return SC_ERR;
    if (r->grad[o] && !empty(own(r, 0, o)) && !empty(own(r, 1, o)) &&
        backward_instr(r, i))
      return SC_ERR;
    _sc_drop(&r->grad[o]); /* nothing later reads value o */
    _sc_drop(&r->val[o]);
    _sc_drop(&r->aux[i]);
  }
  return SC_OK;
}

/* The part of the tile's backward below the cut c: recompute values 0 .. c
 * and back-propagate r->grad[c] in row pieces of c's region, each piece
 * with its own (smaller) cone. Exact for the same reason as the tiling
 * itself: the gradient of c is a sum over its rows. */
static int backward_pieces(sc_run *r) {
  const sc_program *p = r->p;
  const int64_t c = r->cut;
  const int64_t rows[2] = {region(r, 0, c)[0], region(r, 0, c)[1]};
  const int64_t cols[2] = {region(r, 1, c)[0], region(r, 1, c)[1]};
  const sc_axis_plan *tile_plans[2] = {r->cur[0], r->cur[1]};
  AtenTensorHandle gc = r->grad[c];
  int rc = SC_ERR;
  r->grad[c] = NULL;
  _sc_run_tile_release(r);
  sc_axis_plan *pr = sc_axis_plan_new(p), *pc = sc_axis_plan_new(p);
  if (!pr || !pc) {
    sc_fail(&r->ctx->err, "streamcnn: out of memory");
    goto done;
  }
  if (sc_plan_axis_to(p, r->sizes, 1, c, cols[0], cols[1], pc, &r->ctx->err))
    goto done;
  const int64_t n = rows[1] - rows[0];
  const int64_t k = r->pieces < n ? r->pieces : n;
  r->cur[0] = pr;
  r->cur[1] = pc;
  r->keep_from = 0;
  for (int64_t j = 0; j < k; j++) {
    const int64_t lo = rows[0] + n * j / k, hi = rows[0] + n * (j + 1) / k;
    if (sc_plan_axis_to(p, r->sizes, 0, c, lo, hi, pr, &r->ctx->err) ||
        _sc_forward_tile(r, 1))
      goto done;
    const int64_t piece[2] = {lo, hi};
    if (_sc_subview(r, gc, rows, cols, piece, cols, &r->grad[c])) goto done;
    r->grad_mine[c] = 0; /* shared by the pieces: read only */
    if (backward_range(r, c, 0)) goto done;
    _sc_run_tile_release(r);
  }
  rc = SC_OK;
done:
  r->cur[0] = tile_plans[0];
  r->cur[1] = tile_plans[1];
  _sc_drop(&gc);
  sc_axis_plan_free(pr);
  sc_axis_plan_free(pc);
  return rc;
}

int _sc_backward_tile(sc_run *r, AtenTensorHandle grad_out) {
  const int64_t ov = r->p->n_instr;
  r->keep_from = r->cut; /* below the cut: recomputed piecewise */
  if (_sc_forward_tile(r, 1)) return SC_ERR;
  const int64_t *rs = region(r, 0, ov), *cs = region(r, 1, ov);
  /* (empty: a restricted tile with pending gradients only, sparse.c) */
  if (!value_empty(r, ov) &&
      _sc_view(r->ctx, grad_out, rs[0] - r->out_row0, /* a band's rows */
               rs[1] - rs[0], cs[0], cs[1] - cs[0], &r->grad[ov]))
    return SC_ERR;
  r->grad_mine[ov] = 0; /* the caller's tensor: read only */
  if (backward_range(r, ov, r->cut)) return SC_ERR;
  if (r->cut && r->grad[r->cut]) return backward_pieces(r);
  return SC_OK;
}

/* Where to split each tile's backward. A cut c must separate the program:
 * no instruction after it reads a value before it. It pays where the values
 * before c hold at least twice the elements per image pixel (channels /
 * stride^2) of every value from c on, as in a ResNet stem (conv1 .. relu:
 * 64 channels at half resolution; from the max pool on: 64 channels at a
 * quarter): the backward would otherwise hold those dense values for the
 * whole tile. The earliest such cut recomputes least. The part before it
 * then runs in `pieces` row pieces, each about as heavy as the rest. */
void _sc_choose_cut(sc_run *r) {
  const sc_program *p = r->p;
  const int64_t n = p->n_instr;
  double *dens = malloc((size_t)r->nv * sizeof *dens);
  double *suffix = malloc((size_t)r->nv * sizeof *suffix);
  int64_t *min_in = malloc((size_t)r->nv * sizeof *min_in);
  r->cut = 0;
  r->pieces = 1;
  if (dens && suffix && min_in) {
    for (int64_t v = 0; v < r->nv; v++)
      dens[v] = (double)p->channels[v] /
                ((double)p->vstride[2 * v] * (double)p->vstride[2 * v + 1]);
    /* suffix[c]: max density of values c .. n; min_in[c]: smallest value
     * read by instructions c .. n - 1 */
    suffix[n] = dens[n];
    min_in[n] = n;
    for (int64_t c = n - 1; c >= 0; c--) {
      const sc_instr *in = &p->instr[c];
      suffix[c] = dens[c] > suffix[c + 1] ? dens[c] : suffix[c + 1];
      min_in[c] = min_in[c + 1];
      for (int j = 0; j < in->n_in; j++)
        if (in->in[j] < min_in[c]) min_in[c] = in->in[j];
    }
    double prefix = 0.0; /* max density of values 1 .. c - 1 */
    for (int64_t c = 2; c < n && !r->cut; c++) {
      if (dens[c - 1] > prefix) prefix = dens[c - 1];
      if (min_in[c] >= c && prefix >= 2.0 * suffix[c]) {
        r->cut = c;
        r->pieces = (int64_t)ceil(prefix / suffix[c]);
      }
    }
  }
  free(dens);
  free(suffix);
  free(min_in); /* on allocation failure: no split, correct, only heavier */
}
