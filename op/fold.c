/*
 * fold.c — batch norms folded into the convolution before them
 * (_sc_fusion decides which; float32 / float64 only): the folded weights
 * once per call (_sc_fold_init), the backward of a folded convolution
 * against them, and after the last tile the conversion of the summed
 * gradients into the convolution's and the batch norm's own
 * (_sc_fold_grads_finish).
 *
 * Owns: r->fused, r->fold, r->fsum (released by _sc_run_release).
 * Calls: run.c, forward.c (the convolution's input again), aten.c.
 * Called by backward.c and replay.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

/* See internal.h. */
int _sc_fold_init(sc_run *r) {
  const sc_program *p = r->p;
  sc_ctx *ctx = r->ctx;
  /* fold batch norms into their convolutions in float32 / float64 (in half
   * precision the folded weight would round once more) */
  _sc_fusion(p, ctx->kdtype == SC_DTYPE_F32 || ctx->kdtype == SC_DTYPE_F64,
             r->fused);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    if (in->op != SC_OP_CONV || r->fused[i] < 0) continue;
    const sc_instr *bn = &p->instr[r->fused[i]];
    AtenTensorHandle p4[4] = {param(r, bn->bn_weight), param(r, bn->bn_bias),
                              param(r, bn->bn_mean), param(r, bn->bn_var)};
    if (_sc_fold_bn(ctx, param(r, in->weight), param(r, in->bias), p4,
                    bn->eps, &r->fold[4 * i]))
      return SC_ERR;
  }
  return SC_OK;
}

/* The four parameters of convolution i and its folded batch norm, and
 * which of their gradients are wanted. */
static void fused_params(const sc_run *r, int64_t i, int64_t k[4],
                         int want[4]) {
  const sc_instr *in = &r->p->instr[i], *bn = &r->p->instr[r->fused[i]];
  k[0] = in->weight;
  k[1] = in->bias;
  k[2] = bn->bn_weight;
  k[3] = bn->bn_bias;
  for (int j = 0; j < 4; j++) want[j] = wants(r, k[j]);
}

/* Backward of convolution i with batch norm fused[i] folded in, given g,
 * the batch norm's output gradient over the tile's own span: the input's
 * gradient against the folded weight; for the parameters, the weight
 * gradient against it and g's per-channel sum, summed over the tiles
 * (the four gradients are linear in them: _sc_fold_grads_finish). */
int _sc_fused_conv_backward(sc_run *r, int64_t i, AtenTensorHandle g) {
  const sc_instr *in = &r->p->instr[i];
  int64_t k[4];
  int want[4];
  fused_params(r, i, k, want);
  const int sums = want[1] || want[2] || want[3];
  /* g's per-channel sum is the convolution's bias gradient: one call */
  const int m[3] = {r->needs[in->in[0]], _sc_conv_wgrad(r->p, r->mask, r->fused, i),
                    sums};
  AtenTensorHandle x = NULL, res[3] = {NULL, NULL, NULL};
  int rc = SC_OK;
  if (m[0] || m[1])
    rc = (m[1] ? _sc_layer_input(r, i, 0, 0.0, &x)
               : _sc_layer_shape(r, i, 0, &x)) ||
         _sc_conv_backward(r->ctx, g, x, r->fold[4 * i], in, m, res) ||
         (m[0] && _sc_accum_input(r, i, 0, res[0], 1)) ||
         (m[1] && _sc_accum_sum(r->ctx, &r->fsum[2 * i], &res[1]));
  else if (sums)
    rc = _sc_channel_sum(r->ctx, g, &res[2]);
  if (!rc && sums) rc = _sc_accum_sum(r->ctx, &r->fsum[2 * i + 1], &res[2]);
  _sc_drop(&x);
  for (int j = 0; j < 3; j++) _sc_drop(&res[j]);
  return rc;
}

/* After the last tile: each fused pair's parameter gradients from its sums
 * (_sc_fold_bn_grads), added to the parameters' (which other uses of the
 * same tensors may share). */
int _sc_fold_grads_finish(sc_run *r) {
  for (int64_t i = 0; i < r->p->n_instr; i++) {
    if (r->p->instr[i].op != SC_OP_CONV || r->fused[i] < 0) continue;
    const sc_instr *in = &r->p->instr[i], *bn = &r->p->instr[r->fused[i]];
    int64_t k[4];
    int want[4], rc = SC_OK;
    fused_params(r, i, k, want);
    if (!want[0] && !want[1] && !want[2] && !want[3]) continue;
    if ((want[0] || want[2]) && !r->fsum[2 * i]) continue; /* no tile ran */
    if ((want[1] || want[2] || want[3]) && !r->fsum[2 * i + 1]) continue;
    AtenTensorHandle p4[4] = {param(r, bn->bn_weight), param(r, bn->bn_bias),
                              param(r, bn->bn_mean), param(r, bn->bn_var)};
    AtenTensorHandle pg[4] = {NULL, NULL, NULL, NULL};
    rc = _sc_fold_bn_grads(r->ctx, param(r, in->weight), param(r, in->bias),
                           p4, &r->fold[4 * i], r->fsum[2 * i],
                           r->fsum[2 * i + 1], want, pg);
    _sc_drop(&r->fsum[2 * i]);
    _sc_drop(&r->fsum[2 * i + 1]);
    for (int j = 0; j < 4; j++)
      if (!rc && want[j]) rc = _sc_accum_param(r, k[j], &pg[j]);
    for (int j = 0; j < 4; j++) _sc_drop(&pg[j]);
    if (rc) return SC_ERR;
  }
  return SC_OK;
}
