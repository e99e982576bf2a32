/*
 * analysis.c — program analysis that is not box arithmetic: which batch
 * norms fold into their convolution (_sc_fusion), whether a convolution
 * computes its weight gradient (_sc_conv_wgrad), which values carry a
 * gradient (_sc_needs) and which a backward op reads (_sc_keep_set).
 * Plain integers only. Owns nothing it allocates; callers pass the arrays.
 * Called by the replay (replay.c, backward) and the memory model
 * (models.c); calls nothing but the program's fields.
 */
#include "internal.h"

int _sc_act_uses_output(int act) {
  return act == SC_ACT_RELU || act == SC_ACT_SIGMOID || act == SC_ACT_TANH;
}

/* See internal.h. */
int _sc_param_wanted(const int *mask, int64_t k) {
  return k >= 0 && (!mask || mask[1 + k]);
}

int _sc_conv_wgrad(const sc_program *p, const int *mask, const int64_t *fused,
                   int64_t i) {
  const sc_instr *in = &p->instr[i];
  return _sc_param_wanted(mask, in->weight) ||
         (fused && fused[i] >= 0 &&
          _sc_param_wanted(mask, p->instr[fused[i]].bn_weight));
}

void _sc_fusion(const sc_program *p, int fuse, int64_t *fused) {
  for (int64_t i = 0; i < p->n_instr; i++) fused[i] = -1;
  for (int64_t j = 0; fuse && j < p->n_instr; j++) {
    const sc_instr *bn = &p->instr[j];
    const int64_t v = bn->in[0];
    if (bn->op != SC_OP_BATCHNORM || v < 1 || p->n_consumers[v] != 1 ||
        p->instr[v - 1].op != SC_OP_CONV)
      continue;
    fused[v - 1] = j;
    fused[j] = v - 1;
  }
}

/* Parameters whose gradient instruction i computes: its own, and a fused
 * convolution's the batch norm's too. */
static int instr_wants(const sc_program *p, const int64_t *fused, int64_t i,
                       const int *mask) {
  const sc_instr *in = &p->instr[i];
  if (_sc_param_wanted(mask, in->weight) || _sc_param_wanted(mask, in->bias) ||
      _sc_param_wanted(mask, in->bn_weight) ||
      _sc_param_wanted(mask, in->bn_bias))
    return 1;
  if (fused && fused[i] >= 0 && in->op == SC_OP_CONV) {
    const sc_instr *bn = &p->instr[fused[i]];
    return _sc_param_wanted(mask, bn->bn_weight) ||
           _sc_param_wanted(mask, bn->bn_bias);
  }
  return 0;
}

void _sc_needs(const sc_program *p, const int *mask, const int64_t *fused,
               unsigned char *needs) {
  needs[0] = (unsigned char)(!mask || mask[0]);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int nd = needs[in->in[0]] || (in->n_in > 1 && needs[in->in[1]]) ||
                   instr_wants(p, fused, i, mask);
    needs[i + 1] = (unsigned char)nd;
  }
}

void _sc_keep_set(const sc_program *p, const unsigned char *needs,
                  const int *mask, const int64_t *fused, unsigned char *keep) {
  for (int64_t v = 0; v <= p->n_instr; v++) keep[v] = 0;
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    if (!needs[i + 1]) continue;
    switch (in->op) {
    case SC_OP_ADD:
    case SC_OP_CAT:
    case SC_OP_CHANNELS: /* the gradient's channels moved: no input read */
      break;
    case SC_OP_ACT:
      keep[_sc_act_uses_output(in->act) ? i + 1 : in->in[0]] = 1;
      break;
    case SC_OP_CONV: /* linear in the input: only the weight's takes it */
      if (_sc_conv_wgrad(p, mask, fused, i)) keep[in->in[0]] = 1;
      break;
    case SC_OP_LINEAR_C:
    case SC_OP_SCALE_C:
      if (_sc_param_wanted(mask, in->weight)) keep[in->in[0]] = 1;
      break;
    case SC_OP_BATCHNORM: /* frozen statistics: affine in the input */
      if (_sc_param_wanted(mask, in->bn_weight) && !(fused && fused[i] >= 0))
        keep[in->in[0]] = 1;
      break;
    default: /* pools (their input's maxima and shape), layer norm */
      keep[in->in[0]] = 1;
    }
  }
}

/* Instruction 0 is a per-channel affine map of the image read by nothing
 * else, e.g. the mean / std normalisation a StreamingModule puts in front
 * (a depthwise 1 x 1 convolution, stride 1, no padding, no folded batch
 * norm), whose weight takes no gradient in this call: the image gather
 * applies it (_sc_gather_affine), so neither the image tile in the
 * computation's dtype nor a convolution pass over it exists. The
 * convolution's backward needs only the input's shape then. */
int _sc_image_affine_shape(const sc_program *p) {
  if (p->n_instr < 1 || p->n_consumers[0] != 1) return 0;
  const sc_instr *in = &p->instr[0];
  if (in->op != SC_OP_CONV || in->in[0] != 0 || in->groups != in->c_in ||
      in->c_out != in->c_in)
    return 0;
  for (int a = 0; a < 2; a++) {
    const sc_window *w = &in->win[a];
    if (w->k != 1 || w->s != 1 || w->pad_lo != 0 || w->pad_hi != 0) return 0;
  }
  return 1;
}
