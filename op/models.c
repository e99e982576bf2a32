/*
 * models.c — the work and memory models of a streamed pass, from the tile
 * plans alone (no torch): multiply-adds and elements of a forward, whole
 * image vs. streamed (sc_work_info), and the peak bytes of the largest
 * tile's forward and backward and of the halo strips (sc_memory_info,
 * tile_peak). Plain integers and doubles. Calls geometry.c (plans, tiling,
 * _sc_decode_and_tile) and analysis.c (_sc_fusion, _sc_needs,
 * _sc_keep_set); called through the public API (Python: work_info,
 * memory_info, the memory budget).
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Multiply-adds per output pixel of an instruction (conv, linear_c), else 0. */
static double macs_per_pixel(const sc_instr *in) {
  if (in->op == SC_OP_CONV)
    return (double)in->c_out * (double)(in->c_in / in->groups) *
           (double)in->win[0].k * (double)in->win[1].k;
  if (in->op == SC_OP_LINEAR_C) return (double)in->c_out * (double)in->c_in;
  return 0.0;
}

/* Elements of instruction i's weight: one multiply-add per weight element
 * and output pixel for conv and linear_c, one per channel otherwise. */
static double weight_elements(const sc_instr *in) {
  const double m = macs_per_pixel(in);
  return m > 0.0 ? m : (double)in->c_out;
}

/* What the tiles along one axis hold: their distinct region extents per
 * value (interior tiles share one; the first and last differ) and, per
 * value, the own extents and (cached plans) the halo extents summed over
 * the tiles. For a plain plan own = region, so `owned` is the summed region
 * extent. */
typedef struct axis_sum {
  int64_t *ext;     /* n_shapes rows of nv extents */
  int64_t *oext;    /* n_shapes rows of nv own extents */
  int64_t *rext;    /* n_shapes rows of n_instr extents read by input slot 0
                       (padding included) */
  int64_t n_shapes;
  double *owned;    /* nv */
  double *halo;     /* nv */
} axis_sum;

static void axis_sum_free(axis_sum *s) {
  free(s->ext);
  free(s->rext);
  free(s->oext);
  free(s->owned);
  free(s->halo);
  s->ext = s->rext = s->oext = NULL;
  s->owned = s->halo = NULL;
}

static int axis_summary(const sc_program *p, const int64_t *sizes, int axis,
                        int64_t t, int64_t tile_in, int cached,
                        sc_axis_plan *plan, axis_sum *s, sc_error *err) {
  const int64_t n_out = sizes[2 * p->n_instr + axis];
  const int64_t count = (n_out + t - 1) / t;
  const int64_t nv = p->n_instr + 1;
  int64_t *bounds = malloc((size_t)(count + 1) * sizeof *bounds);
  s->n_shapes = 0;
  s->ext = malloc((size_t)(count * nv) * sizeof *s->ext);
  s->rext = malloc((size_t)(count * p->n_instr + 1) * sizeof *s->rext);
  s->oext = malloc((size_t)(count * nv) * sizeof *s->oext);
  s->owned = calloc((size_t)nv, sizeof *s->owned);
  s->halo = calloc((size_t)nv, sizeof *s->halo);
  int rc;
  if (!bounds || !s->ext || !s->rext || !s->oext || !s->owned || !s->halo)
    rc = sc_fail(err, "streamcnn: out of memory");
  else
    rc = _sc_tile_bounds(p, sizes, axis, t, tile_in, cached, plan, bounds,
                         err);
  for (int64_t k = 0; !rc && k < count; k++) {
    const int64_t lo = bounds[k], hi = bounds[k + 1];
    rc = cached ? sc_plan_axis_cached(p, sizes, axis, lo, hi, plan, err)
                : sc_plan_axis(p, sizes, axis, lo, hi, plan, err);
    if (rc) break;
    int64_t *e = &s->ext[s->n_shapes * nv], *oe = &s->oext[s->n_shapes * nv];
    for (int64_t v = 0; v < nv; v++) {
      const int64_t *rg = &plan->region[2 * v], *ow = &plan->own[2 * v];
      e[v] = rg[1] > rg[0] ? rg[1] - rg[0] : 0;
      oe[v] = ow[1] > ow[0] ? ow[1] - ow[0] : 0;
      if (ow[1] > ow[0]) s->owned[v] += (double)(ow[1] - ow[0]);
      if (cached && lo > 0 && v > 0 && e[v] > 0 && ow[0] > rg[0])
        s->halo[v] += (double)(ow[0] - rg[0]);
    }
    int64_t *re = &s->rext[s->n_shapes * p->n_instr];
    for (int64_t i = 0; i < p->n_instr; i++) {
      const int64_t *rd = &plan->read[4 * i];
      re[i] = rd[1] > rd[0] ? rd[1] - rd[0] : 0;
    }
    int64_t u = 0; /* a shape seen before? */
    for (; u < s->n_shapes; u++)
      if (!memcmp(&s->ext[u * nv], e, (size_t)nv * sizeof *e) &&
          !memcmp(&s->oext[u * nv], oe, (size_t)nv * sizeof *oe) &&
          !memcmp(&s->rext[u * p->n_instr], re,
                  (size_t)p->n_instr * sizeof *re))
        break;
    if (u == s->n_shapes) s->n_shapes++;
  }
  free(bounds);
  return rc;
}

/* Elements of value v's halos over all tiles (cached summaries): the bands
 * (halo rows x own columns) and the left strips (own rows x halo columns),
 * what forward_cached keeps; per batch element. */
static double strip_elements(const sc_program *p, const axis_sum s[2],
                             int64_t v) {
  return (s[0].halo[v] * s[1].owned[v] + s[0].owned[v] * s[1].halo[v]) *
         (double)p->channels[v];
}

int sc_work_info(const int64_t *words, int64_t n_words, int64_t h, int64_t w,
                 int64_t tile_h, int64_t tile_w, double *work, char *errbuf,
                 size_t errlen) {
  sc_error err = {0};
  sc_program *p;
  int64_t *sizes;
  axis_sum cone[2] = {{0}, {0}}, cached[2] = {{0}, {0}};
  sc_axis_plan *plan = NULL;
  const int64_t tile[2] = {tile_h, tile_w};
  int64_t t[2];
  int rc = SC_ERR;
  if (_sc_decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes,
                          t, &err))
    goto done;
  plan = sc_axis_plan_new(p);
  if (!plan) {
    sc_fail(&err, "streamcnn: out of memory");
    goto done;
  }
  /* tiles are products of a row span and a column span: each value's
   * summed area over all tiles is (sum of its row extents) x (sum of its
   * column extents), of the regions (cones) or of the own spans (cached) */
  for (int a = 0; a < 2; a++)
    if (axis_summary(p, sizes, a, t[a], tile[a], 0, plan, &cone[a], &err) ||
        axis_summary(p, sizes, a, t[a], tile[a], 1, plan, &cached[a], &err))
      goto done;
  for (int k = 0; k < SC_WORK_WORDS; k++) work[k] = 0.0;
  for (int64_t i = 0; i < p->n_instr; i++) {
    const int64_t v = i + 1;
    const double whole = (double)sizes[2 * v] * (double)sizes[2 * v + 1];
    const double tiled = cone[0].owned[v] * cone[1].owned[v];
    const double once = cached[0].owned[v] * cached[1].owned[v];
    const double m = macs_per_pixel(&p->instr[i]);
    const double c = (double)p->channels[v];
    work[0] += m * whole;
    work[1] += m * tiled;
    work[2] += c * whole;
    work[3] += c * tiled;
    work[4] += m * once;
    work[5] += c * once;
    work[6] += strip_elements(p, cached, v);
  }
  rc = SC_OK;
done:
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  for (int a = 0; a < 2; a++) {
    axis_sum_free(&cone[a]);
    axis_sum_free(&cached[a]);
  }
  free(sizes);
  sc_axis_plan_free(plan);
  sc_program_free(p);
  return rc;
}

/* Peak bytes (per batch element) of one tile, simulated in the order the
 * replay allocates and frees (op/replay.c): sz[v] the bytes of value v's
 * region, own[v] of the part the tile computes (a cached plan's halo is
 * the rest: the computed part is copied into a region-sized buffer),
 * rd[i] of what instruction i reads through slot 0 (window ops: their
 * padded input copy), ix the bytes of a max-pool index per byte of value.
 * The tile of the image counts as the tile's (a uint8 or host image is
 * gathered into one; with a normalisation fused into that gather, see
 * affine_image in op/replay.c, neither it nor the normalising convolution's
 * transients exist: conservative by a few channels' tile). Forward without
 * gradient (*fwd): each value lives
 * until its last consumer ran; a ReLU or an add whose input nothing else
 * reads works in place, as does a batch norm fused into its convolution
 * (fused, see _sc_fusion). Backward (*bwd): the recompute keeps the values
 * in keep; then each instruction backward, with its transients (a window
 * op's padded input and input gradient, a max pool's output and indices
 * taken again, a pointwise op's input gradient; a ReLU's in place), the
 * first gradient of an input adopted, later ones added and freed, and the
 * instruction's output and its gradient freed after it. A convolution's
 * library holds transients of its own in both passes (lib[i], conv_lib).
 * Conservative where the replay may save: every window op is taken to pad
 * (only border tiles do). */
/* Bytes a convolution's library holds while instruction in runs (forward
 * or backward), reading rd bytes and computing own bytes of output, of
 * itemsize item. CUDA (cuDNN): a copy of its input and of its output
 * (conservative; its workspace is not modelled). CPU (cpu = 1): oneDNN
 * (float32) runs the channels-last tiles in place, counted as on CUDA;
 * ATen's own im2col convolution, which float64 always takes, float32 for
 * small inputs (batch 1, groups 1, not both kernel extents over 3, at most
 * 20480 input values; taken as possible for any batch) and float16 /
 * bfloat16 where oneDNN lacks them, holds the columns: c_in / groups x
 * kh x kw values per output pixel, one group at a time (none for a 1 x 1
 * kernel of stride 1). With under 16 channels in and out, oneDNN may
 * instead run a gemm convolution with about as much scratch, or copy
 * input and output in a layout blocked by 16 channels (a 1-channel value
 * is as much NCHW as channels-last, and its tile runs NCHW from there);
 * the larger is counted. */
static int64_t pad16(int64_t c) { return (c + 15) / 16 * 16; }

static double conv_lib(const sc_instr *in, double rd, double own, double item,
                       int cpu) {
  const double copies = rd + own;
  if (!cpu) return copies;
  const sc_window *wr = &in->win[0], *wc = &in->win[1];
  const int unit = wr->k == 1 && wc->k == 1 && wr->s == 1 && wc->s == 1;
  const double cols =
      unit ? 0.0
           : own / (double)in->c_out * (double)(in->c_in / in->groups) *
                 (double)(wr->k * wc->k);
  if (item == 8.0) return cols;
  double lib = copies;
  if (in->groups == 1 && in->c_in < 16 && in->c_out < 16) {
    /* oneDNN, few channels: its copies may be NCHW blocked by 16 */
    const double padded = rd * (double)pad16(in->c_in) / (double)in->c_in +
                          own * (double)pad16(in->c_out) / (double)in->c_out;
    lib = padded > cols ? padded : cols;
  }
  const int im2col = item != 4.0 || (in->groups == 1 &&
                                     !(wr->k > 3 && wc->k > 3) &&
                                     rd / item <= 20480.0);
  return im2col && cols > lib ? cols : lib;
}

/* Bytes a convolution's library holds besides conv_lib's while it computes
 * the weight gradient (backward only). CPU float32 / bfloat16 (oneDNN, the
 * tiles channels-last): an undilated depthwise convolution no wider than 3
 * columns runs oneDNN's depthwise kernel, its weight gradient blocked by 16
 * channels; any other convolution computes its weight gradient blocked
 * 16 x 16 per group, each group's channels in and out padded to 16 (a
 * depthwise 5 x 5 one's: 256 times its weight; oneDNN 3.10's verbose
 * output names the layout "aBCde16c16b"), in the compute dtype. (bfloat16
 * also holds scratch that grows with the tile, not modelled: see
 * bench/RESULTS.md.) float64 and float16 run ATen's own convolution (the
 * weight gradient plain, counted by param_grad_bytes); CUDA: not
 * modelled. */
static double conv_wgrad_lib(const sc_instr *in, double item, int cpu) {
  if (!cpu || (item != 4.0 && item != 2.0)) return 0.0;
  const sc_window *wr = &in->win[0], *wc = &in->win[1];
  const int64_t g = in->groups, ci = in->c_in / g, co = in->c_out / g;
  const double k = (double)(wr->k * wc->k);
  if (ci == 1 && co == 1 && wr->d == 1 && wc->d == 1 && wc->k <= 3)
    return (double)pad16(g) * k * item;
  return (double)g * (double)pad16(co) * (double)pad16(ci) * k * item;
}

/* Instruction i hands its input's buffer on as its output (forward, when
 * nothing else reads it) and its output's gradient on as its input's
 * (backward): add, ReLU, a batch norm folded into its convolution. */
static int passes_on(const sc_instr *in, const int64_t *fused, int64_t i) {
  return in->op == SC_OP_ADD ||
         (in->op == SC_OP_ACT && in->act == SC_ACT_RELU) ||
         (in->op == SC_OP_BATCHNORM && fused[i] >= 0);
}

/* Whether average pool `in` may divide by a map of divisors (they vary at
 * the image's border: padding not counted, or a ceil_mode window). */
static int avg_may_divide(const sc_instr *in) {
  if (in->op != SC_OP_AVGPOOL || in->divisor_override) return 0;
  for (int a = 0; a < 2; a++) {
    const sc_window *w = &in->win[a];
    if (w->ceil_mode || (!in->count_include_pad && (w->pad_lo || w->pad_hi)))
      return 1;
  }
  return 0;
}

static void tile_peak(const sc_program *p, const unsigned char *needs,
                      const unsigned char *keep, const int64_t *fused,
                      const double *sz, const double *own, const double *rd,
                      const double *lib, const double *libw, double ix,
                      int half,
                      int64_t *left, unsigned char *has_grad, double *bwd,
                      double *fwd) {
  const int64_t nv = p->n_instr + 1, ov = p->n_instr;
  for (int pass = 0; pass < 2; pass++) { /* 0: forward, 1: recompute */
    double live = sz[0], peak = sz[0];
    for (int64_t v = 0; v < nv; v++) left[v] = p->n_consumers[v];
    for (int64_t i = 0; i < p->n_instr; i++) {
      const sc_instr *in = &p->instr[i];
      const int64_t o = i + 1, x = in->in[0];
      const int halo = own[o] < sz[o];
      const int in_place = passes_on(in, fused, i) && x != 0 &&
                           p->n_consumers[x] == 1 && !(pass && keep[x]) &&
                           !halo;
      double t = in_place ? 0.0 : own[o] + (halo ? sz[o] : 0.0);
      if (_sc_is_window(in->op)) t += rd[i];
      /* ATen's max_pool2d takes the indices too, and drops them; an
       * average pool may divide by a map of divisors (one channel), for
       * halves in float32 (twice the bytes): its input and sums too */
      if (in->op == SC_OP_MAXPOOL) t += ix * own[o];
      if (avg_may_divide(in))
        t += half ? 2.0 * (rd[i] + own[o] + own[o] / (double)p->channels[o])
                  : own[o] / (double)p->channels[o];
      t += lib[i]; /* a convolution library's transients */
      if (live + t > peak) peak = live + t;
      live += sz[o];
      for (int j = 0; j < in->n_in; j++) {
        const int64_t v = in->in[j];
        if (--left[v] == 0 && v != ov && !(pass && keep[v])) live -= sz[v];
      }
    }
    if (!pass) {
      *fwd = peak;
      continue;
    }
    /* backward; live holds the kept values and the output */
    for (int64_t v = 0; v < nv; v++) has_grad[v] = 0;
    for (int64_t i = p->n_instr - 1; i >= 0; i--) {
      const sc_instr *in = &p->instr[i];
      const int64_t o = i + 1;
      const int mine = o != ov; /* the output's gradient is the caller's */
      if (needs[o]) {
        double t = 0.0, adopt = 0.0;
        for (int j = 0; j < in->n_in; j++) {
          const int64_t v = in->in[j];
          if (!needs[v]) continue;
          double gi; /* the input gradient this op makes */
          /* a pointwise op's covers v's own part: with a halo, v's
           * gradient is a new region-sized buffer it is added into */
          int whole = own[v] >= sz[v];
          if (_sc_is_window(in->op)) {
            gi = rd[i];
            whole = 1; /* it reads all of v's region */
          } else if (mine && j == 0 && passes_on(in, fused, i)) {
            gi = 0.0; /* the output's gradient itself */
          } else if (in->op == SC_OP_CAT || in->op == SC_OP_CHANNELS) {
            /* CAT: its channels, copied; CHANNELS: the input's, zeros and
             * the gradient's channels */
            gi = own[o] * (double)p->channels[v] / (double)p->channels[o];
          } else {
            gi = own[o];
          }
          t += gi;
          if (!has_grad[v]) {
            if (whole) {
              adopt += gi > 0.0 ? gi : sz[o];
            } else {
              adopt += sz[v];
              t += sz[v];
            }
            has_grad[v] = 1;
          }
        }
        if (_sc_is_window(in->op)) t += rd[i]; /* its (padded) input */
        if (in->op == SC_OP_MAXPOOL) t += (1.0 + ix) * own[o]; /* again */
        if (avg_may_divide(in)) /* g over the divisor map, and it; for
                                 * halves in float32, the input gradient
                                 * and a tensor of the input's shape too */
          t += half ? 2.0 * own[o] * (1.0 + 1.0 / (double)p->channels[o]) +
                          4.0 * rd[i]
                    : own[o] * (1.0 + 1.0 / (double)p->channels[o]);
        t += lib[i] + libw[i];
        if (live + t > peak) peak = live + t;
        live += adopt - (mine ? sz[o] : 0.0);
      }
      if (keep[o] || o == ov) live -= sz[o];
    }
    *bwd = peak;
  }
}

/* Elements of the folded weights, biases and scales the replay holds for a
 * call: one weight-sized tensor and three per-channel ones per fused
 * convolution. */
static double fold_elements(const sc_program *p, const int64_t *fused) {
  double sum = 0.0;
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    if (in->op == SC_OP_CONV && fused[i] >= 0)
      sum += weight_elements(in) + 3.0 * (double)in->c_out;
  }
  return sum;
}

/* Bytes of the parameter gradients a backward accumulates over the tiles
 * (each wanted parameter once) plus twice the largest one (a tile's share
 * before it is added, and a fused pair's weight gradient against the
 * folded weight). Half precision accumulates in float32 (_sc_accum_param)
 * and returns the sums in its own dtype at the end: those too. */
static double param_grad_bytes(const sc_program *p, const int *mask,
                               double item) {
  double sum = 0.0, big = 0.0;
  for (int64_t k = 0; k < p->n_params; k++) {
    if (!_sc_param_wanted(mask, k)) continue;
    double n = 0.0; /* its size, from the first instruction using it */
    for (int64_t i = 0; i < p->n_instr && n == 0.0; i++) {
      const sc_instr *in = &p->instr[i];
      if (in->weight == k)
        n = weight_elements(in);
      else if (in->bias == k || in->bn_weight == k || in->bn_bias == k)
        n = (double)in->c_out; /* per-channel: biases, norms */
    }
    sum += n;
    if (n > big) big = n;
  }
  return item == 2.0 ? (sum + 2.0 * big) * 4.0 + sum * item
                     : (sum + 2.0 * big) * item;
}

int sc_memory_info(const int64_t *words, int64_t n_words, int64_t h,
                   int64_t w, int64_t tile_h, int64_t tile_w, int flags,
                   const int *mask, int itemsize, double *mem, char *errbuf,
                   size_t errlen) {
  const int cached = flags & SC_MEMORY_CACHED, cpu = !!(flags & SC_MEMORY_CPU);
  sc_error err = {0};
  sc_program *p = NULL;
  int64_t *sizes = NULL, *left = NULL;
  axis_sum ax[2] = {{0}, {0}};
  unsigned char *needs = NULL, *keep = NULL, *has_grad = NULL;
  int64_t *fused = NULL;
  double *sz = NULL, *own = NULL, *rd = NULL, *lib = NULL, *libw = NULL;
  sc_axis_plan *plan = NULL;
  const int64_t tile[2] = {tile_h, tile_w};
  int64_t t[2];
  int rc = SC_ERR;
  if (flags & ~(SC_MEMORY_CACHED | SC_MEMORY_CPU)) {
    sc_fail(&err, "streamcnn: unknown memory_info flags %d", flags);
    goto done;
  }
  if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
    sc_fail(&err, "streamcnn: itemsize must be 1, 2, 4 or 8, got %d",
            itemsize);
    goto done;
  }
  if (_sc_decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes,
                          t, &err))
    goto done;
  const int64_t nv = p->n_instr + 1, ni = p->n_instr;
  plan = sc_axis_plan_new(p);
  needs = malloc((size_t)nv);
  keep = malloc((size_t)nv);
  has_grad = malloc((size_t)nv);
  left = malloc((size_t)nv * sizeof *left);
  sz = malloc((size_t)nv * sizeof *sz);
  own = malloc((size_t)nv * sizeof *own);
  rd = malloc((size_t)(ni + 1) * sizeof *rd);
  lib = malloc((size_t)(ni + 1) * sizeof *lib);
  libw = malloc((size_t)(ni + 1) * sizeof *libw);
  fused = malloc((size_t)(ni + 1) * sizeof *fused);
  if (!plan || !needs || !keep || !has_grad || !left || !sz || !own || !rd ||
      !lib || !libw || !fused) {
    sc_fail(&err, "streamcnn: out of memory");
    goto done;
  }
  for (int a = 0; a < 2; a++)
    if (axis_summary(p, sizes, a, t[a], tile[a], cached, plan, &ax[a], &err))
      goto done;
  _sc_fusion(p, itemsize >= 4, fused); /* as the replay does */
  _sc_needs(p, mask, fused, needs);
  _sc_keep_set(p, needs, mask, fused, keep);
  const double item = (double)itemsize, ix = 8.0 / item; /* int64 indices */
  double bwd = 0.0, fwd = 0.0, strips = 0.0;
  for (int64_t i = 0; i < ax[0].n_shapes; i++)
    for (int64_t j = 0; j < ax[1].n_shapes; j++) {
      const int64_t *e0 = &ax[0].ext[i * nv], *e1 = &ax[1].ext[j * nv];
      const int64_t *o0 = &ax[0].oext[i * nv], *o1 = &ax[1].oext[j * nv];
      const int64_t *r0 = &ax[0].rext[i * ni], *r1 = &ax[1].rext[j * ni];
      for (int64_t v = 0; v < nv; v++) {
        const double c = (double)p->channels[v] * item;
        sz[v] = (double)e0[v] * (double)e1[v] * c;
        own[v] = v ? (double)o0[v] * (double)o1[v] * c : sz[v];
      }
      for (int64_t k = 0; k < ni; k++) {
        const sc_instr *in = &p->instr[k];
        rd[k] = (double)r0[k] * (double)r1[k] *
                (double)p->channels[in->in[0]] * item;
        lib[k] = in->op == SC_OP_CONV
                     ? conv_lib(in, rd[k], own[k + 1], item, cpu)
                     : 0.0;
        libw[k] = in->op == SC_OP_CONV && _sc_conv_wgrad(p, mask, fused, k)
                      ? conv_wgrad_lib(in, item, cpu)
                      : 0.0;
      }
      double b = 0.0, f = 0.0; /* tile_peak sets both */
      tile_peak(p, needs, keep, fused, sz, own, rd, lib, libw, ix,
                itemsize == 2, left, has_grad, &b, &f);
      if (b > bwd) bwd = b;
      if (f > fwd) fwd = f;
    }
  double bands = 0.0; /* all bands of one row boundary, on average */
  for (int64_t v = 1; cached && v < nv; v++) { /* bands and left strips */
    strips += strip_elements(p, ax, v) * item;
    bands += ax[0].halo[v] * ax[1].owned[v] * (double)p->channels[v] * item;
  }
  const int64_t n_rows = (sizes[2 * p->n_instr] + t[0] - 1) / t[0];
  if (n_rows > 1) bands /= (double)(n_rows - 1);
  /* a cached pass holds two rows' bands at a time: the forward the one it
   * reads and the one it writes, the backward their pending gradients */
  const double folds = fold_elements(p, fused) * item;
  /* the image's gradient (mask[0]): one image-sized tensor the tiles'
   * input gradients are added into */
  const double image_grad =
      !mask || mask[0] ? (double)p->channels[0] * (double)h * (double)w * item
                      : 0.0;
  mem[0] = bwd + 2.0 * bands + param_grad_bytes(p, mask, item) + folds +
           image_grad;
  mem[1] = fwd + 2.0 * bands + folds;
  mem[2] = strips;
  rc = SC_OK;
done:
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  for (int a = 0; a < 2; a++) axis_sum_free(&ax[a]);
  free(needs);
  free(keep);
  free(has_grad);
  free(left);
  free(sz);
  free(own);
  free(rd);
  free(lib);
  free(libw);
  free(fused);
  sc_axis_plan_free(plan);
  free(sizes);
  sc_program_free(p);
  return rc;
}

/* See streamcnn.h. The rows are planned as run_init (replay.c) plans a
 * band with halo caching (_sc_tile_bounds_range, _sc_plan_axis_cached_from:
 * the first row tile owns its whole cone, the others take their band halo
 * from the row above), the columns as for the whole image. */
int sc_band_info(const int64_t *words, int64_t n_words, int64_t h, int64_t w,
                 int64_t tile_h, int64_t tile_w, int64_t out_lo,
                 int64_t out_hi, double *info, char *errbuf, size_t errlen) {
  sc_error err = {0};
  sc_program *p;
  int64_t *sizes, *bounds = NULL;
  axis_sum cols = {0};
  sc_axis_plan *plan = NULL;
  double *owned = NULL, *halo = NULL;
  int64_t t[2];
  int rc = SC_ERR;
  if (_sc_decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes,
                          t, &err))
    goto done;
  const int64_t nv = p->n_instr + 1, out_h = sizes[2 * p->n_instr];
  if (out_lo < 0 || out_hi <= out_lo || out_hi > out_h) {
    sc_fail(&err,
            "streamcnn: rows [%lld, %lld) is not a non-empty range of the "
            "stem output's %lld rows",
            (long long)out_lo, (long long)out_hi, (long long)out_h);
    goto done;
  }
  const int64_t n = (out_hi - out_lo + t[0] - 1) / t[0];
  plan = sc_axis_plan_new(p);
  bounds = malloc((size_t)(n + 1) * sizeof *bounds);
  owned = calloc((size_t)nv, sizeof *owned);
  halo = calloc((size_t)nv, sizeof *halo);
  if (!plan || !bounds || !owned || !halo) {
    sc_fail(&err, "streamcnn: out of memory");
    goto done;
  }
  /* image rows: the cone of the band's output rows */
  if (sc_plan_axis(p, sizes, 0, out_lo, out_hi, plan, &err)) goto done;
  info[0] = (double)plan->region[0];
  info[1] = (double)plan->region[1];
  if (axis_summary(p, sizes, 1, t[1], tile_w, 1, plan, &cols, &err) ||
      _sc_tile_bounds_range(p, sizes, 0, out_lo, out_hi, t[0], tile_h, 1,
                            plan, bounds, &err))
    goto done;
  for (int64_t k = 0; k < n; k++) {
    if (_sc_plan_axis_cached_from(p, sizes, 0, out_lo, bounds[k],
                                  bounds[k + 1], plan, &err))
      goto done;
    for (int64_t v = 0; v < nv; v++) {
      const int64_t *rg = &plan->region[2 * v], *ow = &plan->own[2 * v];
      if (ow[1] > ow[0]) owned[v] += (double)(ow[1] - ow[0]);
      if (k > 0 && v > 0 && rg[1] > rg[0] && ow[0] > rg[0])
        halo[v] += (double)(ow[0] - rg[0]);
    }
  }
  info[2] = info[3] = 0.0;
  for (int64_t i = 0; i < p->n_instr; i++) {
    const int64_t v = i + 1;
    info[2] += (halo[v] * cols.owned[v] + owned[v] * cols.halo[v]) *
               (double)p->channels[v];
    info[3] += macs_per_pixel(&p->instr[i]) * owned[v] * cols.owned[v];
  }
  rc = SC_OK;
done:
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  axis_sum_free(&cols);
  free(bounds);
  free(owned);
  free(halo);
  free(sizes);
  sc_axis_plan_free(plan);
  sc_program_free(p);
  return rc;
}
