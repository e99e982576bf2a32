/*
 * program.c — decode and validate the flat int64 layer program.
 *
 * Layout (all words int64):
 *   [magic, version, in_channels, n_instructions, n_params,
 *    instruction 0, instruction 1, ...]
 * Each instruction is [opcode, n_fields, field_0 .. field_{n_fields-1}].
 * Values: 0 is the image, i + 1 the output of instruction i; the output of
 * the last instruction is the program's output. Field lists per opcode:
 *   conv      in, weight, bias, c_in, c_out, groups, kh, kw, sh, sw, dh, dw,
 *             pad_top, pad_bottom, pad_left, pad_right
 *   maxpool   in, kh, kw, sh, sw, dh, dw, ph, pw, ceil_mode
 *   avgpool   in, kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad,
 *             divisor_override (0 = none)
 *   batchnorm in, weight, bias, running_mean, running_var, eps (double bits)
 *   act       in, kind, arg (leaky slope as double bits; gelu: 0 erf, 1 tanh)
 *   add       a, b
 *   layernorm_c  in, weight, bias, eps (double bits): layer norm over the
 *             channels of each pixel (ConvNeXt's LayerNorm2d, or nn.LayerNorm
 *             after a permute to channels-last)
 *   linear_c  in, weight [c_out, c_in], bias [c_out], c_in, c_out: a Linear
 *             on the channels of each pixel (after a permute)
 *   scale_c   in, scale (c elements): per-channel scale (layer scale)
 *   cat       a, b: the channels of a, then those of b (torch.cat along
 *             the channels; a longer cat is a chain of these)
 *   channels  in, c_out, start, groups, a, b: output channel k = q * groups
 *             + r (0 <= r < groups) is input channel start + r * a + q * b,
 *             each input channel at most once (torch.chunk / split /
 *             x[:, i:j:s] along the channels: groups 1, b the step;
 *             ShuffleNet's channel shuffle of C channels in g groups:
 *             groups g, a C / g, b 1)
 * Parameter fields index the params tensor list; -1 means absent where a
 * field is optional (conv bias, batch-norm weight and bias).
 *
 * Nothing here reads past n_words, and every value used later by the
 * geometry is range-checked so that its arithmetic cannot overflow.
 */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sc_fail(sc_error *err, const char *fmt, ...) {
  if (err && !err->set) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    err->set = 1;
  }
  return SC_ERR;
}

const char *_sc_op_name(int op) {
  switch (op) {
  case SC_OP_CONV: return "conv";
  case SC_OP_MAXPOOL: return "maxpool";
  case SC_OP_AVGPOOL: return "avgpool";
  case SC_OP_BATCHNORM: return "batchnorm";
  case SC_OP_ACT: return "act";
  case SC_OP_ADD: return "add";
  case SC_OP_LAYERNORM_C: return "layernorm_c";
  case SC_OP_LINEAR_C: return "linear_c";
  case SC_OP_SCALE_C: return "scale_c";
  case SC_OP_CAT: return "cat";
  case SC_OP_CHANNELS: return "channels";
  default: return "unknown";
  }
}

static int expected_fields(int64_t op) {
  switch (op) {
  case SC_OP_CONV: return SC_CONV_FIELDS;
  case SC_OP_MAXPOOL: return SC_MAXPOOL_FIELDS;
  case SC_OP_AVGPOOL: return SC_AVGPOOL_FIELDS;
  case SC_OP_BATCHNORM: return SC_BATCHNORM_FIELDS;
  case SC_OP_ACT: return SC_ACT_FIELDS;
  case SC_OP_ADD: return SC_ADD_FIELDS;
  case SC_OP_LAYERNORM_C: return SC_LAYERNORM_C_FIELDS;
  case SC_OP_LINEAR_C: return SC_LINEAR_C_FIELDS;
  case SC_OP_SCALE_C: return SC_SCALE_C_FIELDS;
  case SC_OP_CAT: return SC_CAT_FIELDS;
  case SC_OP_CHANNELS: return SC_CHANNELS_FIELDS;
  default: return -1;
  }
}

static double bits_to_double(int64_t w) {
  double d;
  memcpy(&d, &w, sizeof d);
  return d;
}

/* Reader over one instruction's fields; names fields in messages. */
typedef struct reader {
  const int64_t *f; /* fields of the instruction */
  int64_t index;    /* instruction index */
  int op;
  sc_error *err;
} reader;

static int field_range(reader *r, int i, const char *name, int64_t lo,
                       int64_t hi, int64_t *out) {
  int64_t v = r->f[i];
  if (v < lo || v > hi)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (%s): field '%s' = "
                   "%lld is out of range [%lld, %lld]",
                   (long long)r->index, _sc_op_name(r->op), name,
                   (long long)v, (long long)lo, (long long)hi);
  *out = v;
  return SC_OK;
}

static int field_flag(reader *r, int i, const char *name, int *out) {
  int64_t v = 0;
  if (field_range(r, i, name, 0, 1, &v)) return SC_ERR;
  *out = (int)v;
  return SC_OK;
}

/* A channels instruction's map: groups divides out_channels, and every
 * input channel it names exists and is named once (its backward scatters
 * the gradient back; a channel taken twice would need a sum). */
static int check_channel_map(reader *r, const sc_instr *in, int64_t c_in) {
  const int64_t g = in->groups, q_n = in->c_out / g;
  if (in->c_out % g)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (channels): field "
                   "'groups' = %lld does not divide out_channels (%lld)",
                   (long long)r->index, (long long)g, (long long)in->c_out);
  /* the largest channel named: all terms are >= 0 and < 2^25 */
  const int64_t last = in->ch_start + (g - 1) * in->ch_a + (q_n - 1) * in->ch_b;
  if (last >= c_in)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (channels): it takes "
                   "channel %lld of input value %lld, which has %lld",
                   (long long)r->index, (long long)last, (long long)in->in[0],
                   (long long)c_in);
  unsigned char *seen = calloc((size_t)c_in, 1);
  if (!seen) return sc_fail(r->err, "streamcnn: out of memory decoding a program");
  int64_t twice = -1;
  for (int64_t q = 0; q < q_n && twice < 0; q++)
    for (int64_t k = 0; k < g; k++) {
      const int64_t c = in->ch_start + k * in->ch_a + q * in->ch_b;
      if (seen[c]++) {
        twice = c;
        break;
      }
    }
  free(seen);
  if (twice >= 0)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (channels): it takes "
                   "input channel %lld twice (groups %lld, a %lld, b %lld)",
                   (long long)r->index, (long long)twice, (long long)g,
                   (long long)in->ch_a, (long long)in->ch_b);
  return SC_OK;
}

/* Input value: any earlier value (0 = image). */
static int field_value(reader *r, int i, const char *name, int64_t *out) {
  return field_range(r, i, name, 0, r->index, out);
}

/* Parameter index into the params list; optional ones may be -1. */
static int field_param(reader *r, int i, const char *name, int optional,
                       int64_t n_params, int64_t *out) {
  int64_t v = r->f[i];
  if (optional && v == -1) {
    *out = -1;
    return SC_OK;
  }
  if (v < 0 || v >= n_params)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (%s): field '%s' = "
                   "%lld is not a valid index into the %lld parameter "
                   "tensors%s",
                   (long long)r->index, _sc_op_name(r->op), name,
                   (long long)v, (long long)n_params,
                   optional ? " (use -1 for none)" : "");
  *out = v;
  return SC_OK;
}

static int field_double(reader *r, int i, const char *name, double lo,
                        double *out) {
  double v = bits_to_double(r->f[i]);
  if (!isfinite(v) || v < lo)
    return sc_fail(r->err,
                   "streamcnn: program instruction %lld (%s): field '%s' = "
                   "%g must be a finite number >= %g",
                   (long long)r->index, _sc_op_name(r->op), name, v, lo);
  *out = v;
  return SC_OK;
}

/* kh kw sh sw [dh dw] fields starting at i; dilation 1 when !has_dil. */
static int read_window(reader *r, int i, int has_dil, sc_window win[2]) {
  static const char *names[] = {"kernel_h", "kernel_w", "stride_h",
                                "stride_w", "dilation_h", "dilation_w"};
  int64_t v[6] = {0, 0, 0, 0, 1, 1};
  for (int j = 0; j < (has_dil ? 6 : 4); j++)
    if (field_range(r, i + j, names[j], 1, SC_MAX_WINDOW, &v[j]))
      return SC_ERR;
  for (int a = 0; a < 2; a++) {
    win[a].k = v[a];
    win[a].s = v[2 + a];
    win[a].d = v[4 + a];
    win[a].ceil_mode = 0;
  }
  return SC_OK;
}

/* Symmetric pool padding at fields i, i+1, with ATen's bound (max and
 * average pooling alike): at most half the kernel, k / 2, dilation aside. */
static int read_pool_padding(reader *r, int i, sc_window win[2]) {
  static const char *names[] = {"pad_h", "pad_w"};
  for (int a = 0; a < 2; a++) {
    int64_t p = 0;
    if (field_range(r, i + a, names[a], 0, win[a].k / 2, &p)) return SC_ERR;
    win[a].pad_lo = win[a].pad_hi = p;
  }
  return SC_OK;
}

static int decode_instr(reader *r, const sc_program *p, sc_instr *in) {
  const int64_t n_params = p->n_params;
  memset(in, 0, sizeof *in);
  in->op = r->op;
  in->n_in = 1;
  in->weight = in->bias = -1;
  in->bn_weight = in->bn_bias = in->bn_mean = in->bn_var = -1;
  switch (r->op) {
  case SC_OP_CONV: {
    static const char *pad_names[] = {"pad_top", "pad_bottom", "pad_left",
                                      "pad_right"};
    int64_t pads[4] = {0, 0, 0, 0};
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_param(r, 1, "weight", 0, n_params, &in->weight) ||
        field_param(r, 2, "bias", 1, n_params, &in->bias) ||
        field_range(r, 3, "in_channels", 1, SC_MAX_CHANNELS, &in->c_in) ||
        field_range(r, 4, "out_channels", 1, SC_MAX_CHANNELS, &in->c_out) ||
        field_range(r, 5, "groups", 1, SC_MAX_CHANNELS, &in->groups) ||
        read_window(r, 6, 1, in->win))
      return SC_ERR;
    for (int j = 0; j < 4; j++)
      if (field_range(r, 12 + j, pad_names[j], 0, SC_MAX_WINDOW, &pads[j]))
        return SC_ERR;
    in->win[0].pad_lo = pads[0];
    in->win[0].pad_hi = pads[1];
    in->win[1].pad_lo = pads[2];
    in->win[1].pad_hi = pads[3];
    if (in->c_in != p->channels[in->in[0]])
      return sc_fail(r->err,
                     "streamcnn: program instruction %lld (conv): field "
                     "'in_channels' = %lld but its input value %lld has %lld "
                     "channels",
                     (long long)r->index, (long long)in->c_in,
                     (long long)in->in[0],
                     (long long)p->channels[in->in[0]]);
    if (in->c_in % in->groups || in->c_out % in->groups)
      return sc_fail(r->err,
                     "streamcnn: program instruction %lld (conv): field "
                     "'groups' = %lld must divide in_channels (%lld) and "
                     "out_channels (%lld)",
                     (long long)r->index, (long long)in->groups,
                     (long long)in->c_in, (long long)in->c_out);
    return SC_OK;
  }
  case SC_OP_MAXPOOL:
    if (field_value(r, 0, "input", &in->in[0]) ||
        read_window(r, 1, 1, in->win) || read_pool_padding(r, 7, in->win) ||
        field_flag(r, 9, "ceil_mode", &in->win[0].ceil_mode))
      return SC_ERR;
    in->win[1].ceil_mode = in->win[0].ceil_mode;
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  case SC_OP_AVGPOOL:
    if (field_value(r, 0, "input", &in->in[0]) ||
        read_window(r, 1, 0, in->win) || read_pool_padding(r, 5, in->win) ||
        field_flag(r, 7, "ceil_mode", &in->win[0].ceil_mode) ||
        field_flag(r, 8, "count_include_pad", &in->count_include_pad) ||
        field_range(r, 9, "divisor_override", 0, SC_MAX_WINDOW * SC_MAX_WINDOW,
                    &in->divisor_override))
      return SC_ERR;
    in->win[1].ceil_mode = in->win[0].ceil_mode;
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  case SC_OP_BATCHNORM:
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_param(r, 1, "weight", 1, n_params, &in->bn_weight) ||
        field_param(r, 2, "bias", 1, n_params, &in->bn_bias) ||
        field_param(r, 3, "running_mean", 0, n_params, &in->bn_mean) ||
        field_param(r, 4, "running_var", 0, n_params, &in->bn_var) ||
        field_double(r, 5, "eps", 0.0, &in->eps))
      return SC_ERR;
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  case SC_OP_ACT: {
    int64_t kind = 0;
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_range(r, 1, "kind", SC_ACT_RELU, SC_ACT_HARDSWISH, &kind))
      return SC_ERR;
    in->act = (int)kind;
    if (kind == SC_ACT_LEAKY_RELU) {
      if (field_double(r, 2, "negative_slope", -INFINITY, &in->act_arg))
        return SC_ERR;
    } else if (kind == SC_ACT_GELU) {
      if (field_range(r, 2, "approximate", 0, 1, &in->act_iarg)) return SC_ERR;
    } else {
      int64_t unused;
      if (field_range(r, 2, "arg", 0, 0, &unused)) return SC_ERR;
    }
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  }
  case SC_OP_ADD:
  case SC_OP_CAT: {
    in->n_in = 2;
    if (field_value(r, 0, "a", &in->in[0]) ||
        field_value(r, 1, "b", &in->in[1]))
      return SC_ERR;
    const int64_t ca = p->channels[in->in[0]], cb = p->channels[in->in[1]];
    if (r->op == SC_OP_ADD && ca != cb)
      return sc_fail(r->err,
                     "streamcnn: program instruction %lld (add): inputs %lld "
                     "and %lld have %lld and %lld channels",
                     (long long)r->index, (long long)in->in[0],
                     (long long)in->in[1], (long long)ca, (long long)cb);
    if (r->op == SC_OP_CAT && ca + cb > SC_MAX_CHANNELS)
      return sc_fail(r->err,
                     "streamcnn: program instruction %lld (cat): inputs %lld "
                     "and %lld have %lld + %lld channels, more than %lld",
                     (long long)r->index, (long long)in->in[0],
                     (long long)in->in[1], (long long)ca, (long long)cb,
                     (long long)SC_MAX_CHANNELS);
    in->c_out = r->op == SC_OP_CAT ? ca + cb : ca;
    return SC_OK;
  }
  case SC_OP_LAYERNORM_C:
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_param(r, 1, "weight", 1, n_params, &in->weight) ||
        field_param(r, 2, "bias", 1, n_params, &in->bias) ||
        field_double(r, 3, "eps", 0.0, &in->eps))
      return SC_ERR;
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  case SC_OP_LINEAR_C:
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_param(r, 1, "weight", 0, n_params, &in->weight) ||
        field_param(r, 2, "bias", 1, n_params, &in->bias) ||
        field_range(r, 3, "in_channels", 1, SC_MAX_CHANNELS, &in->c_in) ||
        field_range(r, 4, "out_channels", 1, SC_MAX_CHANNELS, &in->c_out))
      return SC_ERR;
    if (in->c_in != p->channels[in->in[0]])
      return sc_fail(r->err,
                     "streamcnn: program instruction %lld (linear_c): field "
                     "'in_channels' = %lld but its input value %lld has %lld "
                     "channels",
                     (long long)r->index, (long long)in->c_in,
                     (long long)in->in[0],
                     (long long)p->channels[in->in[0]]);
    return SC_OK;
  case SC_OP_SCALE_C:
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_param(r, 1, "scale", 0, n_params, &in->weight))
      return SC_ERR;
    in->c_out = p->channels[in->in[0]];
    return SC_OK;
  case SC_OP_CHANNELS:
    if (field_value(r, 0, "input", &in->in[0]) ||
        field_range(r, 1, "out_channels", 1, SC_MAX_CHANNELS, &in->c_out) ||
        field_range(r, 2, "start", 0, SC_MAX_CHANNELS, &in->ch_start) ||
        field_range(r, 3, "groups", 1, in->c_out, &in->groups) ||
        field_range(r, 4, "a", 0, SC_MAX_CHANNELS, &in->ch_a) ||
        field_range(r, 5, "b", 0, SC_MAX_CHANNELS, &in->ch_b))
      return SC_ERR;
    return check_channel_map(r, in, p->channels[in->in[0]]);
  default:
    return sc_fail(r->err, "streamcnn: internal error: opcode %d", r->op);
  }
}

void sc_program_free(sc_program *p) {
  if (!p) return;
  free(p->instr);
  free(p->channels);
  free(p->n_consumers);
  free(p->vstride);
  free(p);
}

int sc_program_decode(const int64_t *words, int64_t n_words,
                      sc_program **out, sc_error *err) {
  *out = NULL;
  if (!words || n_words < SC_PROGRAM_HEADER)
    return sc_fail(err,
                   "streamcnn: program has %lld words; a program starts with "
                   "%d header words (magic, version, in_channels, "
                   "n_instructions, n_params)",
                   (long long)n_words, SC_PROGRAM_HEADER);
  if (words[0] != SC_PROGRAM_MAGIC)
    return sc_fail(err,
                   "streamcnn: program does not start with the magic word "
                   "0x%llx (got %lld): not a streamcnn program",
                   (unsigned long long)SC_PROGRAM_MAGIC, (long long)words[0]);
  if (words[1] != SC_PROGRAM_VERSION)
    return sc_fail(err,
                   "streamcnn: program version %lld is not supported (this "
                   "library reads version %d)",
                   (long long)words[1], SC_PROGRAM_VERSION);
  if (words[2] < 1 || words[2] > SC_MAX_CHANNELS)
    return sc_fail(err,
                   "streamcnn: program header: in_channels = %lld is out of "
                   "range [1, %lld]",
                   (long long)words[2], (long long)SC_MAX_CHANNELS);
  if (words[3] < 1 || words[3] > SC_MAX_INSTRUCTIONS)
    return sc_fail(err,
                   "streamcnn: program header: n_instructions = %lld is out "
                   "of range [1, %d]",
                   (long long)words[3], SC_MAX_INSTRUCTIONS);
  if (words[4] < 0 || words[4] > 4 * SC_MAX_INSTRUCTIONS)
    return sc_fail(err,
                   "streamcnn: program header: n_params = %lld is out of "
                   "range [0, %d]",
                   (long long)words[4], 4 * SC_MAX_INSTRUCTIONS);

  sc_program *p = calloc(1, sizeof *p);
  if (!p) return sc_fail(err, "streamcnn: out of memory decoding program");
  p->in_channels = words[2];
  p->n_instr = words[3];
  p->n_params = words[4];
  p->instr = calloc((size_t)p->n_instr, sizeof *p->instr);
  p->channels = calloc((size_t)p->n_instr + 1, sizeof *p->channels);
  p->n_consumers = calloc((size_t)p->n_instr + 1, sizeof *p->n_consumers);
  /* total stride per value and axis (added values must align) */
  int64_t *vstride = calloc(2 * ((size_t)p->n_instr + 1), sizeof *vstride);
  p->vstride = vstride; /* owned by p from here */
  if (!p->instr || !p->channels || !p->n_consumers || !vstride) {
    sc_program_free(p);
    return sc_fail(err, "streamcnn: out of memory decoding program");
  }
  p->channels[0] = p->in_channels;
  vstride[0] = vstride[1] = 1;
  /* Image span [reach_lo, reach_hi] (inclusive, per axis) one pixel of each
   * value reads. Its extent, the receptive field, is bounded by
   * SC_MAX_EXTENT (no tile could hold more), which keeps all plan
   * arithmetic in int64: each instruction adds at most 2^24 taps times a
   * stride <= 2^31 to a span that was <= 2^31, and the offsets (padding
   * times stride, <= 2^43 each) sum to < 2^60 over 2^16 instructions. */
  int64_t *reach = calloc(4 * ((size_t)p->n_instr + 1), sizeof *reach);
  if (!reach) {
    sc_program_free(p);
    return sc_fail(err, "streamcnn: out of memory decoding program");
  }

  int64_t pos = SC_PROGRAM_HEADER;
  for (int64_t i = 0; i < p->n_instr; i++) {
    if (n_words - pos < 2) {
      sc_fail(err,
              "streamcnn: program ends inside instruction %lld: expected "
              "[opcode, n_fields, ...] at word %lld of %lld",
              (long long)i, (long long)pos, (long long)n_words);
      goto fail;
    }
    int64_t op = words[pos], nf = words[pos + 1];
    int want = expected_fields(op);
    if (want < 0) {
      sc_fail(err,
              "streamcnn: program instruction %lld: unknown opcode %lld "
              "(word %lld)",
              (long long)i, (long long)op, (long long)pos);
      goto fail;
    }
    if (nf != want) {
      sc_fail(err,
              "streamcnn: program instruction %lld (%s): n_fields = %lld, "
              "expected %d",
              (long long)i, _sc_op_name((int)op), (long long)nf, want);
      goto fail;
    }
    if (n_words - pos - 2 < nf) {
      sc_fail(err,
              "streamcnn: program ends inside instruction %lld (%s): needs "
              "%lld fields, %lld words left",
              (long long)i, _sc_op_name((int)op), (long long)nf,
              (long long)(n_words - pos - 2));
      goto fail;
    }
    reader r = {words + pos + 2, i, (int)op, err};
    sc_instr *in = &p->instr[i];
    if (decode_instr(&r, p, in)) goto fail;
    pos += 2 + nf;

    p->channels[i + 1] = in->c_out;
    for (int j = 0; j < in->n_in; j++) p->n_consumers[in->in[j]]++;
    for (int a = 0; a < 2; a++) {
      int64_t s = vstride[2 * in->in[0] + a];
      if (in->op == SC_OP_CONV || in->op == SC_OP_MAXPOOL ||
          in->op == SC_OP_AVGPOOL)
        s *= in->win[a].s;
      if (s > SC_MAX_EXTENT) {
        sc_fail(err,
                "streamcnn: program instruction %lld (%s): total stride %lld "
                "exceeds %lld",
                (long long)i, _sc_op_name(in->op), (long long)s,
                (long long)SC_MAX_EXTENT);
        goto fail;
      }
      if (in->n_in == 2 && vstride[2 * in->in[1] + a] != s) {
        sc_fail(err,
                "streamcnn: program instruction %lld (%s): inputs %lld and "
                "%lld have different total strides along %s (%lld vs %lld)",
                (long long)i, _sc_op_name(in->op), (long long)in->in[0],
                (long long)in->in[1],
                a ? "columns" : "rows", (long long)s,
                (long long)vstride[2 * in->in[1] + a]);
        goto fail;
      }
      vstride[2 * (i + 1) + a] = s;
      const int64_t *rx = &reach[4 * in->in[0] + 2 * a];
      int64_t *ro = &reach[4 * (i + 1) + 2 * a];
      ro[0] = rx[0];
      ro[1] = rx[1];
      if (_sc_is_window(in->op)) {
        const sc_window *w = &in->win[a];
        const int64_t si = vstride[2 * in->in[0] + a];
        ro[0] = rx[0] - w->pad_lo * si;
        ro[1] = rx[1] + (w->d * (w->k - 1) - w->pad_lo) * si;
      } else if (in->n_in == 2) {
        const int64_t *ry = &reach[4 * in->in[1] + 2 * a];
        if (ry[0] < ro[0]) ro[0] = ry[0];
        if (ry[1] > ro[1]) ro[1] = ry[1];
      }
      if (ro[1] - ro[0] + 1 > SC_MAX_EXTENT) {
        sc_fail(err,
                "streamcnn: program instruction %lld (%s): receptive field "
                "%lld along %s exceeds %lld (no tile could hold one output "
                "pixel's input)",
                (long long)i, _sc_op_name(in->op),
                (long long)(ro[1] - ro[0] + 1), a ? "columns" : "rows",
                (long long)SC_MAX_EXTENT);
        goto fail;
      }
    }
  }
  if (pos != n_words) {
    sc_fail(err,
            "streamcnn: program has %lld trailing words after its %lld "
            "instructions",
            (long long)(n_words - pos), (long long)p->n_instr);
    goto fail;
  }
  p->stride[0] = vstride[2 * p->n_instr];
  p->stride[1] = vstride[2 * p->n_instr + 1];
  free(reach);
  *out = p;
  return SC_OK;

fail:
  free(reach);
  sc_program_free(p);
  return SC_ERR;
}
