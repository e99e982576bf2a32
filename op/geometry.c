/*
 * geometry.c — box arithmetic of the tiled replay. Plain integers only.
 *
 * For a window (kernel k, stride s, dilation d, padding pad_lo) the output
 * span [a, b) reads the input span
 *     [a * s - pad_lo, (b - 1) * s - pad_lo + d * (k - 1) + 1).
 * Walking the program backwards from a tile's output span gives the span
 * every value must provide; a value read by several instructions (residual
 * adds) provides the hull. Each value's span is then clipped to the value's
 * extent: only the clipped part is computed, and whatever a window reads
 * outside it is that layer's own padding (zeros, -inf, ...), applied by the
 * replay only where the span crosses the true border. Rows and columns are
 * independent, so a 2-D tile plan is a row plan times a column plan.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static int64_t floor_div(int64_t a, int64_t b) { /* b > 0 */
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

int64_t sc_window_out(const sc_window *w, int64_t n) {
  const int64_t eff = w->d * (w->k - 1) + 1; /* effective kernel extent */
  int64_t num = n + w->pad_lo + w->pad_hi - eff;
  if (w->ceil_mode) num += w->s - 1;
  int64_t out = floor_div(num, w->s) + 1;
  /* ATen: with ceil_mode the last window must start inside the input or
   * the left padding. */
  if (w->ceil_mode && out > 0 && (out - 1) * w->s >= n + w->pad_lo) out--;
  /* Convolutions also need the padded input to cover one kernel extent. */
  if (!w->ceil_mode && num < 0) return 0;
  return out > 0 ? out : 0;
}

int _sc_is_window(int op) {
  return op == SC_OP_CONV || op == SC_OP_MAXPOOL || op == SC_OP_AVGPOOL;
}

int sc_value_sizes(const sc_program *p, int64_t h, int64_t w,
                   int64_t *sizes, sc_error *err) {
  if (h < 1 || w < 1 || h > SC_MAX_EXTENT || w > SC_MAX_EXTENT)
    return sc_fail(err,
                   "streamcnn: image extent %lld x %lld is out of range "
                   "[1, %lld]",
                   (long long)h, (long long)w, (long long)SC_MAX_EXTENT);
  sizes[0] = h;
  sizes[1] = w;
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int64_t *src = &sizes[2 * in->in[0]];
    int64_t *dst = &sizes[2 * (i + 1)];
    if (_sc_is_window(in->op)) {
      for (int a = 0; a < 2; a++) dst[a] = sc_window_out(&in->win[a], src[a]);
      if (dst[0] < 1 || dst[1] < 1)
        return sc_fail(err,
                       "streamcnn: an image of %lld x %lld is too small for "
                       "the stem: instruction %lld (%s) gets a %lld x %lld "
                       "input (kernel %lld x %lld, dilation %lld x %lld, "
                       "padding %lld x %lld) and would produce no output",
                       (long long)h, (long long)w, (long long)i,
                       _sc_op_name(in->op), (long long)src[0],
                       (long long)src[1], (long long)in->win[0].k,
                       (long long)in->win[1].k, (long long)in->win[0].d,
                       (long long)in->win[1].d, (long long)in->win[0].pad_lo,
                       (long long)in->win[1].pad_lo);
    } else {
      dst[0] = src[0];
      dst[1] = src[1];
    }
    if (in->op == SC_OP_ADD) {
      const int64_t *b = &sizes[2 * in->in[1]];
      if (b[0] != src[0] || b[1] != src[1])
        return sc_fail(err,
                       "streamcnn: for a %lld x %lld image, instruction %lld "
                       "(add) adds values of %lld x %lld and %lld x %lld",
                       (long long)h, (long long)w, (long long)i,
                       (long long)src[0], (long long)src[1], (long long)b[0],
                       (long long)b[1]);
    }
  }
  return SC_OK;
}

sc_axis_plan *sc_axis_plan_new(const sc_program *p) {
  sc_axis_plan *plan = calloc(1, sizeof *plan);
  if (!plan) return NULL;
  plan->n_values = p->n_instr + 1;
  plan->region = calloc(2 * (size_t)plan->n_values, sizeof *plan->region);
  plan->own = calloc(2 * (size_t)plan->n_values, sizeof *plan->own);
  plan->read = calloc(4 * (size_t)p->n_instr, sizeof *plan->read);
  if (!plan->region || !plan->own || !plan->read) {
    sc_axis_plan_free(plan);
    return NULL;
  }
  return plan;
}

void sc_axis_plan_free(sc_axis_plan *plan) {
  if (!plan) return;
  free(plan->region);
  free(plan->own);
  free(plan->read);
  free(plan);
}

/* The read span of instruction i's input for its output span o. */
static void read_of(const sc_instr *in, int axis, const int64_t *o,
                    int64_t *rd) {
  rd[0] = rd[1] = 0;
  if (o[1] <= o[0]) return;
  if (_sc_is_window(in->op)) {
    const sc_window *w = &in->win[axis];
    rd[0] = o[0] * w->s - w->pad_lo;
    rd[1] = (o[1] - 1) * w->s - w->pad_lo + w->d * (w->k - 1) + 1;
  } else {
    rd[0] = o[0];
    rd[1] = o[1];
  }
}

int sc_plan_axis(const sc_program *p, const int64_t *sizes, int axis,
                 int64_t lo, int64_t hi, sc_axis_plan *plan, sc_error *err) {
  return sc_plan_axis_to(p, sizes, axis, p->n_instr, lo, hi, plan, err);
}

int sc_plan_axis_to(const sc_program *p, const int64_t *sizes, int axis,
                    int64_t target, int64_t lo, int64_t hi,
                    sc_axis_plan *plan, sc_error *err) {
  const int64_t nv = p->n_instr + 1;
  if (axis < 0 || axis > 1 || plan->n_values != nv || hi <= lo ||
      target < 1 || target > p->n_instr)
    return sc_fail(err, "streamcnn: internal error: bad plan request");
  if (sizes && (lo < 0 || hi > sizes[2 * target + axis]))
    return sc_fail(err, "streamcnn: internal error: tile outside its value");
  /* need[v]: hull of the spans consumers read; kept in region until the
   * value is clipped. Empty spans are lo == hi == 0. */
  int64_t *need = plan->region;
  for (int64_t v = 0; v < nv; v++) need[2 * v] = need[2 * v + 1] = 0;
  for (int64_t i = target; i < p->n_instr; i++)
    for (int k = 0; k < 4; k++) plan->read[4 * i + k] = 0;
  need[2 * target] = lo;
  need[2 * target + 1] = hi;

  for (int64_t i = target - 1; i >= -1; i--) {
    const int64_t o = i + 1;
    int64_t *r = &need[2 * o];
    if (sizes && r[1] > r[0]) { /* clip to the value's extent */
      const int64_t n = sizes[2 * o + axis];
      if (r[0] < 0) r[0] = 0;
      if (r[1] > n) r[1] = n;
    }
    if (r[1] <= r[0]) r[0] = r[1] = 0;
    if (i < 0) break; /* value 0, the image: nothing reads before it */

    const sc_instr *in = &p->instr[i];
    for (int j = 0; j < 2; j++) {
      int64_t *rd = &plan->read[4 * i + 2 * j];
      rd[0] = rd[1] = 0;
      if (j >= in->n_in || r[1] <= r[0]) continue;
      read_of(in, axis, r, rd);
      int64_t *nd = &need[2 * in->in[j]];
      if (nd[1] <= nd[0]) {
        nd[0] = rd[0];
        nd[1] = rd[1];
      } else {
        if (rd[0] < nd[0]) nd[0] = rd[0];
        if (rd[1] > nd[1]) nd[1] = rd[1];
      }
    }
  }
  for (int64_t k = 0; k < 2 * nv; k++) plan->own[k] = need[k];
  return SC_OK;
}

int sc_plan_axis_cached(const sc_program *p, const int64_t *sizes, int axis,
                        int64_t lo, int64_t hi, sc_axis_plan *plan,
                        sc_error *err) {
  const int64_t nv = p->n_instr + 1;
  if (!sizes || axis < 0 || axis > 1 || plan->n_values != nv || lo < 0 ||
      hi <= lo)
    return sc_fail(err, "streamcnn: internal error: bad cached plan request");
  /* e_v(lo) into own[2v], e_v(hi) into own[2v + 1], via the cones of
   * [0, lo) and [0, hi) (plan's own arrays as scratch) */
  int64_t *prev = malloc((size_t)nv * sizeof *prev);
  if (!prev) return sc_fail(err, "streamcnn: out of memory");
  for (int64_t v = 0; v < nv; v++) prev[v] = 0;
  if (lo > 0) {
    if (sc_plan_axis(p, sizes, axis, 0, lo, plan, err)) {
      free(prev);
      return SC_ERR;
    }
    for (int64_t v = 0; v < nv; v++) prev[v] = plan->region[2 * v + 1];
  }
  if (sc_plan_axis(p, sizes, axis, 0, hi, plan, err)) {
    free(prev);
    return SC_ERR;
  }
  for (int64_t v = 0; v < nv; v++) {
    const int64_t e = plan->region[2 * v + 1];
    plan->own[2 * v] = prev[v] < e ? prev[v] : e;
    plan->own[2 * v + 1] = e;
    if (e <= plan->own[2 * v]) plan->own[2 * v] = plan->own[2 * v + 1] = e;
  }
  free(prev);
  /* reads of the own spans; regions reach back to the first element read */
  for (int64_t v = 0; v < nv; v++) {
    plan->region[2 * v] = plan->own[2 * v];
    plan->region[2 * v + 1] = plan->own[2 * v + 1];
  }
  for (int64_t i = p->n_instr - 1; i >= 0; i--) {
    const sc_instr *in = &p->instr[i];
    for (int j = 0; j < 2; j++) {
      int64_t *rd = &plan->read[4 * i + 2 * j];
      rd[0] = rd[1] = 0;
      if (j >= in->n_in) continue;
      read_of(in, axis, &plan->own[2 * (i + 1)], rd);
      if (rd[1] <= rd[0]) continue;
      const int64_t u = in->in[j];
      int64_t *rg = &plan->region[2 * u];
      const int64_t first = rd[0] < 0 ? 0 : rd[0];
      if (first < rg[0]) rg[0] = first;
      if (rd[1] > rg[1] && rg[1] < sizes[2 * u + axis])
        return sc_fail(err, "streamcnn: internal error: cached plan reads "
                            "past its value");
    }
  }
  return SC_OK;
}

int64_t sc_input_extent(const sc_program *p, int axis, int64_t t) {
  if (t < 1 || axis < 0 || axis > 1) return -1;
  sc_axis_plan *plan = sc_axis_plan_new(p);
  if (!plan) return -1;
  sc_error err = {0};
  int64_t ext = -1;
  if (sc_plan_axis(p, NULL, axis, 0, t, plan, &err) == SC_OK)
    ext = plan->region[1] - plan->region[0];
  sc_axis_plan_free(plan);
  return ext;
}

int64_t sc_tile_out_extent(const sc_program *p, int axis, int64_t tile) {
  const int64_t rf = sc_input_extent(p, axis, 1);
  if (rf < 1 || tile < rf) return 0;
  const int64_t s = p->stride[axis];
  int64_t t = (tile - rf) / s + 1;
  if (t > SC_MAX_EXTENT) t = SC_MAX_EXTENT;
  /* The extent is affine in t ((t - 1) * s + rf); check rather than trust. */
  while (t > 1 && sc_input_extent(p, axis, t) > tile) t--;
  return t;
}

static void copy_err(const sc_error *e, char *buf, size_t len) {
  if (!buf || !len) return;
  size_t i = 0;
  for (; i + 1 < len && e->msg[i]; i++) buf[i] = e->msg[i];
  buf[i] = 0;
}

int sc_program_info(const int64_t *words, int64_t n_words, int64_t *info,
                    char *errbuf, size_t errlen) {
  sc_error err = {0};
  sc_program *p = NULL;
  if (sc_program_decode(words, n_words, &p, &err)) {
    copy_err(&err, errbuf, errlen);
    return SC_ERR;
  }
  info[0] = p->in_channels;
  info[1] = p->channels[p->n_instr];
  info[2] = sc_input_extent(p, 0, 1);
  info[3] = sc_input_extent(p, 1, 1);
  info[4] = p->stride[0];
  info[5] = p->stride[1];
  info[6] = p->n_params;
  info[7] = p->n_instr;
  sc_program_free(p);
  if (info[2] < 1 || info[3] < 1) {
    sc_fail(&err, "streamcnn: out of memory");
    copy_err(&err, errbuf, errlen);
    return SC_ERR;
  }
  return SC_OK;
}

int _sc_tiling(const sc_program *p, const int64_t *sizes, int64_t tile_h,
               int64_t tile_w, int64_t tile_out[2], sc_error *err) {
  const int64_t tile[2] = {tile_h, tile_w};
  for (int a = 0; a < 2; a++) {
    if (tile[a] < 1 || tile[a] > SC_MAX_EXTENT)
      return sc_fail(err,
                     "streamcnn: tile_size must be in [1, %lld] (got %lld x "
                     "%lld)",
                     (long long)SC_MAX_EXTENT, (long long)tile_h,
                     (long long)tile_w);
    const int64_t t = sc_tile_out_extent(p, a, tile[a]);
    if (t < 1)
      return sc_fail(err,
                     "streamcnn: tile_size %lld x %lld is smaller than what "
                     "one output pixel needs: the minimum tile_size for this "
                     "stem is %lld x %lld (its receptive field)",
                     (long long)tile_h, (long long)tile_w,
                     (long long)sc_input_extent(p, 0, 1),
                     (long long)sc_input_extent(p, 1, 1));
    /* Balance: as few tiles as the limit allows, of near-equal size (e.g.
     * 48+48+48+48 rather than 52+52+52+36): less work per tile at the same
     * count, and fewer distinct buffer shapes for the allocator. */
    const int64_t n_out = sizes[2 * p->n_instr + a];
    const int64_t count = (n_out + t - 1) / t;
    tile_out[a] = (n_out + count - 1) / count;
  }
  return SC_OK;
}

/* Extent of the image (value 0) a cached plan of output [lo, hi) reads. */
static int cached_input_extent(const sc_program *p, const int64_t *sizes,
                               int axis, int64_t lo, int64_t hi,
                               sc_axis_plan *plan, int64_t *ext,
                               sc_error *err) {
  if (sc_plan_axis_cached(p, sizes, axis, lo, hi, plan, err)) return SC_ERR;
  *ext = plan->region[1] > plan->region[0] ? plan->region[1] - plan->region[0]
                                           : 0;
  return SC_OK;
}

/* Extents of the image a cached first tile [0, t0) and the next tile
 * read, the other tiles sharing n_out - t0 evenly. */
static int first_and_next(const sc_program *p, const int64_t *sizes,
                          int axis, int64_t n, int64_t t0, sc_axis_plan *plan,
                          int64_t e[2], sc_error *err) {
  const int64_t n_out = sizes[2 * p->n_instr + axis];
  const int64_t rest = (n_out - t0 + n - 2) / (n - 1);
  return cached_input_extent(p, sizes, axis, 0, t0, plan, &e[0], err) ||
         cached_input_extent(p, sizes, axis, t0,
                             t0 + rest < n_out ? t0 + rest : n_out, plan,
                             &e[1], err);
}

int _sc_tile_bounds(const sc_program *p, const int64_t *sizes, int axis,
                    int64_t t_out, int64_t tile_in, int cached,
                    sc_axis_plan *plan, int64_t *bounds, sc_error *err) {
  const int64_t n_out = sizes[2 * p->n_instr + axis];
  const int64_t n = (n_out + t_out - 1) / t_out;
  bounds[0] = 0;
  if (!cached || n < 2) { /* tiles of t_out */
    for (int64_t k = 1; k <= n; k++)
      bounds[k] = k * t_out < n_out ? k * t_out : n_out;
    return SC_OK;
  }
  /* The first tile reads its whole cone, the others their own part and a
   * thin halo: shrink the first until it reads about as much as the next
   * (the largest tile sets the memory), the others sharing the remainder
   * (see below), none reading more than tile_in. Binary search for the
   * smallest first size reading at least as much as the next (both
   * monotone). */
  int64_t lo = 1, hi = t_out, e[2];
  while (lo < hi) {
    const int64_t t0 = lo + (hi - lo) / 2;
    if (first_and_next(p, sizes, axis, n, t0, plan, e, err)) return SC_ERR;
    if (e[0] >= e[1] && e[1] <= tile_in)
      hi = t0;
    else
      lo = t0 + 1;
  }
  int64_t first = lo;
  if (lo > 1) { /* one less may read less at most */
    int64_t f[2];
    if (first_and_next(p, sizes, axis, n, lo, plan, e, err) ||
        first_and_next(p, sizes, axis, n, lo - 1, plan, f, err))
      return SC_ERR;
    if (f[1] <= tile_in && (f[0] > f[1] ? f[0] : f[1]) <
                               (e[0] > e[1] ? e[0] : e[1]))
      first = lo - 1;
  }
  /* the others of one size, the last the remainder (fewer distinct
   * shapes: the allocator reuses their buffers), or evenly where that
   * would leave the last empty */
  const int64_t rest = n_out - first, step = (rest + n - 2) / (n - 1);
  bounds[1] = first;
  for (int64_t k = 2; k <= n; k++)
    bounds[k] = first + (step * (n - 2) < rest
                             ? (k < n ? step * (k - 1) : rest)
                             : (rest * (k - 1) + (n - 2)) / (n - 1));
  return SC_OK;
}

/* Decode a program and tile an h x w image with it: the shared start of
 * sc_tiling_info and sc_work_info. On success *p, *sizes (per value
 * extents) and tile_out are set; the caller frees *p and *sizes either way. */
static int decode_and_tile(const int64_t *words, int64_t n_words, int64_t h,
                           int64_t w, int64_t tile_h, int64_t tile_w,
                           sc_program **p, int64_t **sizes, int64_t tile_out[2],
                           sc_error *err) {
  *p = NULL;
  *sizes = NULL;
  if (sc_program_decode(words, n_words, p, err)) return SC_ERR;
  *sizes = malloc(2 * ((size_t)(*p)->n_instr + 1) * sizeof **sizes);
  if (!*sizes) return sc_fail(err, "streamcnn: out of memory");
  if (sc_value_sizes(*p, h, w, *sizes, err) ||
      _sc_tiling(*p, *sizes, tile_h, tile_w, tile_out, err))
    return SC_ERR;
  return SC_OK;
}

int sc_tiling_info(const int64_t *words, int64_t n_words, int64_t h,
                   int64_t w, int64_t tile_h, int64_t tile_w, int64_t *plan,
                   char *errbuf, size_t errlen) {
  sc_error err = {0};
  sc_program *p;
  int64_t *sizes;
  int64_t t[2];
  const int rc = decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p,
                                 &sizes, t, &err);
  if (!rc)
    for (int a = 0; a < 2; a++) {
      const int64_t n = sizes[2 * p->n_instr + a];
      plan[a] = n;
      plan[2 + a] = t[a];
      plan[4 + a] = (n + t[a] - 1) / t[a];
    }
  if (rc) copy_err(&err, errbuf, errlen);
  free(sizes);
  sc_program_free(p);
  return rc;
}

int _sc_act_uses_output(int act) {
  return act == SC_ACT_RELU || act == SC_ACT_SIGMOID || act == SC_ACT_TANH;
}

static int param_wanted(const int *mask, int64_t k) {
  return k >= 0 && (!mask || mask[1 + k]);
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
  if (param_wanted(mask, in->weight) || param_wanted(mask, in->bias) ||
      param_wanted(mask, in->bn_weight) || param_wanted(mask, in->bn_bias))
    return 1;
  if (fused && fused[i] >= 0 && in->op == SC_OP_CONV) {
    const sc_instr *bn = &p->instr[fused[i]];
    return param_wanted(mask, bn->bn_weight) || param_wanted(mask, bn->bn_bias);
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
      break;
    case SC_OP_ACT:
      keep[_sc_act_uses_output(in->act) ? i + 1 : in->in[0]] = 1;
      break;
    case SC_OP_CONV: /* linear in the input: it only takes the weight's */
      if (param_wanted(mask, in->weight) ||
          (fused && fused[i] >= 0 && /* and a fused batch norm's weight's */
           param_wanted(mask, p->instr[fused[i]].bn_weight)))
        keep[in->in[0]] = 1;
      break;
    case SC_OP_LINEAR_C:
    case SC_OP_SCALE_C:
      if (param_wanted(mask, in->weight)) keep[in->in[0]] = 1;
      break;
    case SC_OP_BATCHNORM: /* frozen statistics: affine in the input */
      if (param_wanted(mask, in->bn_weight) && !(fused && fused[i] >= 0))
        keep[in->in[0]] = 1;
      break;
    default: /* pools (their input's maxima and shape), layer norm */
      keep[in->in[0]] = 1;
    }
  }
}

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

int sc_tile_bounds(const int64_t *words, int64_t n_words, int64_t h,
                   int64_t w, int64_t tile_h, int64_t tile_w, int cached,
                   int64_t *rows, int64_t rows_cap, int64_t *cols,
                   int64_t cols_cap, char *errbuf, size_t errlen) {
  sc_error err = {0};
  sc_program *p;
  int64_t *sizes;
  sc_axis_plan *plan = NULL;
  const int64_t tile[2] = {tile_h, tile_w}, cap[2] = {rows_cap, cols_cap};
  int64_t *out[2] = {rows, cols}, t[2];
  int rc = decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes,
                           t, &err);
  if (!rc && !(plan = sc_axis_plan_new(p)))
    rc = sc_fail(&err, "streamcnn: out of memory");
  for (int a = 0; a < 2 && !rc; a++) {
    const int64_t n_out = sizes[2 * p->n_instr + a];
    const int64_t n = (n_out + t[a] - 1) / t[a];
    if (!out[a] || cap[a] < n + 1)
      rc = sc_fail(&err, "streamcnn: sc_tile_bounds needs %lld entries",
                   (long long)(n + 1));
    else
      rc = _sc_tile_bounds(p, sizes, a, t[a], tile[a], cached, plan, out[a],
                           &err);
  }
  if (rc) copy_err(&err, errbuf, errlen);
  sc_axis_plan_free(plan);
  free(sizes);
  sc_program_free(p);
  return rc;
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
  if (decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes, t,
                      &err))
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
  if (rc) copy_err(&err, errbuf, errlen);
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

/* Instruction i hands its input's buffer on as its output (forward, when
 * nothing else reads it) and its output's gradient on as its input's
 * (backward): add, ReLU, a batch norm folded into its convolution. */
static int passes_on(const sc_instr *in, const int64_t *fused, int64_t i) {
  return in->op == SC_OP_ADD ||
         (in->op == SC_OP_ACT && in->act == SC_ACT_RELU) ||
         (in->op == SC_OP_BATCHNORM && fused[i] >= 0);
}

static void tile_peak(const sc_program *p, const unsigned char *needs,
                      const unsigned char *keep, const int64_t *fused,
                      const double *sz, const double *own, const double *rd,
                      const double *lib, double ix,
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
       * average pool may divide by a map of divisors (one channel) */
      if (in->op == SC_OP_MAXPOOL) t += ix * own[o];
      if (in->op == SC_OP_AVGPOOL) t += own[o] / (double)p->channels[o];
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
        if (in->op == SC_OP_AVGPOOL) /* g over the divisor map, and it */
          t += own[o] * (1.0 + 1.0 / (double)p->channels[o]);
        t += lib[i];
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

/* Elements of the parameter gradients a backward accumulates over the
 * tiles (each wanted parameter once) plus twice the largest one (a tile's
 * share before it is added, and a fused pair's weight gradient against the
 * folded weight). */
static double param_grad_elements(const sc_program *p, const int *mask) {
  double sum = 0.0, big = 0.0;
  for (int64_t k = 0; k < p->n_params; k++) {
    if (!param_wanted(mask, k)) continue;
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
  return sum + 2.0 * big;
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
  double *sz = NULL, *own = NULL, *rd = NULL, *lib = NULL;
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
  if (decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p, &sizes, t,
                      &err))
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
  fused = malloc((size_t)(ni + 1) * sizeof *fused);
  if (!plan || !needs || !keep || !has_grad || !left || !sz || !own || !rd ||
      !lib || !fused) {
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
      }
      double b, f;
      tile_peak(p, needs, keep, fused, sz, own, rd, lib, ix, left, has_grad,
                &b, &f);
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
  mem[0] = bwd + 2.0 * bands + param_grad_elements(p, mask) * item + folds +
           image_grad;
  mem[1] = fwd + 2.0 * bands + folds;
  mem[2] = strips;
  rc = SC_OK;
done:
  if (rc) copy_err(&err, errbuf, errlen);
  for (int a = 0; a < 2; a++) axis_sum_free(&ax[a]);
  free(needs);
  free(keep);
  free(has_grad);
  free(left);
  free(sz);
  free(own);
  free(rd);
  free(lib);
  free(fused);
  sc_axis_plan_free(plan);
  free(sizes);
  sc_program_free(p);
  return rc;
}
