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
 *
 * Owns: windows, value extents, axis plans (cone and cached), the tiling
 * and the tile bounds (sc_tiling_info, sc_tile_bounds), the unclipped cone
 * of an output box (sc_cone_info). Calls: program.c.
 * The work and memory models built on these plans are in models.c; what
 * the backward needs of the program (fusion, keep sets) in analysis.c.
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
    if (in->n_in == 2) {
      const int64_t *b = &sizes[2 * in->in[1]];
      if (b[0] != src[0] || b[1] != src[1])
        return sc_fail(err,
                       "streamcnn: for a %lld x %lld image, instruction %lld "
                       "(%s) %s values of %lld x %lld and %lld x %lld",
                       (long long)h, (long long)w, (long long)i,
                       _sc_op_name(in->op),
                       in->op == SC_OP_ADD ? "adds" : "joins",
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
  return _sc_plan_axis_cached_from(p, sizes, axis, 0, lo, hi, plan, err);
}

/* See internal.h. Each tile owns, of every value v, its cone of [0, hi)
 * less that of [0, lo) (what the tiles before it own), so only the band's
 * first tile (lo == base) differs from sc_plan_axis_cached: it owns its
 * whole cone, which starts where v's cone of [base, hi) starts instead of
 * at 0, and nothing of a v that cone misses (rows of padding alone: the
 * cone of [0, hi) would be all of v up to its end). */
int _sc_plan_axis_cached_from(const sc_program *p, const int64_t *sizes,
                              int axis, int64_t base, int64_t lo, int64_t hi,
                              sc_axis_plan *plan, sc_error *err) {
  const int64_t nv = p->n_instr + 1;
  if (!sizes || axis < 0 || axis > 1 || plan->n_values != nv || base < 0 ||
      lo < base || hi <= lo)
    return sc_fail(err, "streamcnn: internal error: bad cached plan request");
  /* prev[v]: where v's own span starts, the end of its cone of [0, lo);
   * for the first tile (lo == base) where its cone of [base, hi) starts
   * (INT64_MAX where that cone is empty: nothing to own). The first tile
   * of the whole axis (lo == base == 0) starts at 0. */
  int64_t *prev = malloc((size_t)nv * sizeof *prev);
  if (!prev) return sc_fail(err, "streamcnn: out of memory");
  for (int64_t v = 0; v < nv; v++) prev[v] = 0;
  if (lo > base || base > 0) {
    const int first = lo == base;
    if (sc_plan_axis(p, sizes, axis, first ? base : 0, first ? hi : lo, plan,
                     err)) {
      free(prev);
      return SC_ERR;
    }
    for (int64_t v = 0; v < nv; v++) {
      const int64_t *rg = &plan->region[2 * v];
      prev[v] = !first ? rg[1] : rg[1] > rg[0] ? rg[0] : INT64_MAX;
    }
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

/* b = hull(b, s) for 2-D boxes (rows, cols: b[0..1], b[2..3]); an empty
 * box (either axis) is {0, 0, 0, 0}. */
static void box_hull(int64_t b[4], const int64_t s[4]) {
  if (s[1] <= s[0] || s[3] <= s[2]) return;
  if (b[1] <= b[0] || b[3] <= b[2]) {
    memcpy(b, s, 4 * sizeof *b);
    return;
  }
  for (int a = 0; a < 2; a++) {
    if (s[2 * a] < b[2 * a]) b[2 * a] = s[2 * a];
    if (s[2 * a + 1] > b[2 * a + 1]) b[2 * a + 1] = s[2 * a + 1];
  }
}

/* See internal.h. Top down: value o's region is the hull of its seed and
 * of what its consumers read (clipped to its extent), its own span the
 * region's part inside the tile's own span; the reads of that own span
 * feed the values below. */
int _sc_plan_restrict(const sc_program *p, const int64_t *sizes,
                      const sc_axis_plan *const full[2], const int64_t *seed,
                      sc_axis_plan *const out[2], sc_error *err) {
  const int64_t nv = p->n_instr + 1;
  for (int a = 0; a < 2; a++)
    if (full[a]->n_values != nv || out[a]->n_values != nv)
      return sc_fail(err, "streamcnn: internal error: bad restricted plan");
  int64_t *acc = calloc(4 * (size_t)nv, sizeof *acc); /* box per value */
  if (!acc) return sc_fail(err, "streamcnn: out of memory");
  for (int64_t o = nv - 1; o >= 0; o--) {
    int64_t *b = &acc[4 * o];
    box_hull(b, &seed[4 * o]);
    int own_empty = b[1] <= b[0] || b[3] <= b[2];
    for (int a = 0; a < 2; a++) {
      int64_t *rg = &out[a]->region[2 * o], *ow = &out[a]->own[2 * o];
      const int64_t *fo = &full[a]->own[2 * o], *fr = &full[a]->region[2 * o];
      rg[0] = b[2 * a];
      rg[1] = b[2 * a + 1];
      if (rg[1] > rg[0] && (rg[0] < fr[0] || rg[1] > fr[1])) {
        free(acc);
        return sc_fail(err, "streamcnn: internal error: a restricted plan "
                            "reaches past its tile's region");
      }
      ow[0] = rg[0] > fo[0] ? rg[0] : fo[0];
      ow[1] = rg[1] < fo[1] ? rg[1] : fo[1];
      if (ow[1] <= ow[0]) { /* all of it in the halo along this axis */
        ow[0] = ow[1] = rg[1];
        own_empty = 1;
      }
    }
    if (o == 0) break;
    const sc_instr *in = &p->instr[o - 1];
    for (int j = 0; j < 2; j++) {
      int64_t rd[4] = {0, 0, 0, 0};
      for (int a = 0; a < 2; a++) {
        int64_t *r = &out[a]->read[4 * (o - 1) + 2 * j];
        r[0] = r[1] = 0;
        if (j >= in->n_in || own_empty) continue;
        read_of(in, a, &out[a]->own[2 * o], r);
        const int64_t n = sizes[2 * in->in[j] + a];
        rd[2 * a] = r[0] < 0 ? 0 : r[0];
        rd[2 * a + 1] = r[1] > n ? n : r[1];
      }
      if (j < in->n_in) box_hull(&acc[4 * in->in[j]], rd);
    }
  }
  free(acc);
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

void _sc_copy_err(const sc_error *e, char *buf, size_t len) {
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
    _sc_copy_err(&err, errbuf, errlen);
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
    _sc_copy_err(&err, errbuf, errlen);
    return SC_ERR;
  }
  return SC_OK;
}

/* See streamcnn.h: sc_plan_axis without value extents (no clipping). */
int sc_cone_info(const int64_t *words, int64_t n_words, int64_t out_r0,
                 int64_t out_r1, int64_t out_c0, int64_t out_c1, int64_t *box,
                 char *errbuf, size_t errlen) {
  sc_error err = {0};
  sc_program *p = NULL;
  sc_axis_plan *plan = NULL;
  const int64_t lo[2] = {out_r0, out_c0}, hi[2] = {out_r1, out_c1};
  int rc = SC_ERR;
  if (sc_program_decode(words, n_words, &p, &err)) goto done;
  for (int a = 0; a < 2; a++)
    if (lo[a] >= hi[a] || lo[a] < -SC_MAX_EXTENT || hi[a] > SC_MAX_EXTENT) {
      sc_fail(&err,
              "streamcnn: output %s [%lld, %lld) is not a non-empty range "
              "within [-%lld, %lld]",
              a ? "columns" : "rows", (long long)lo[a], (long long)hi[a],
              (long long)SC_MAX_EXTENT, (long long)SC_MAX_EXTENT);
      goto done;
    }
  plan = sc_axis_plan_new(p);
  if (!plan) {
    sc_fail(&err, "streamcnn: out of memory");
    goto done;
  }
  for (int a = 0; a < 2; a++) {
    if (sc_plan_axis(p, NULL, a, lo[a], hi[a], plan, &err)) goto done;
    box[2 * a] = plan->region[0];
    box[2 * a + 1] = plan->region[1];
  }
  rc = SC_OK;
done:
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  sc_axis_plan_free(plan);
  sc_program_free(p);
  return rc;
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
    /* plans are made per tile: bounded, so that no call runs for hours */
    if (count > SC_MAX_TILES)
      return sc_fail(err,
                     "streamcnn: tile_size %lld x %lld gives %lld tiles along "
                     "the %s, more than %lld: use a larger tile_size",
                     (long long)tile_h, (long long)tile_w, (long long)count,
                     a ? "columns" : "rows", (long long)SC_MAX_TILES);
    tile_out[a] = (n_out + count - 1) / count;
  }
  return SC_OK;
}

/* Extent of the image (value 0) a cached plan of output [lo, hi) reads
 * (tiles from base on). */
static int cached_input_extent(const sc_program *p, const int64_t *sizes,
                               int axis, int64_t base, int64_t lo, int64_t hi,
                               sc_axis_plan *plan, int64_t *ext,
                               sc_error *err) {
  if (_sc_plan_axis_cached_from(p, sizes, axis, base, lo, hi, plan, err))
    return SC_ERR;
  *ext = plan->region[1] > plan->region[0] ? plan->region[1] - plan->region[0]
                                           : 0;
  return SC_OK;
}

/* Extents of the image a cached first tile [b, b + t0) and the next tile
 * read, the other tiles sharing n_out - t0 evenly (b: the first output
 * row or col of the tiled range, n_out its extent). */
static int first_and_next(const sc_program *p, const int64_t *sizes,
                          int axis, int64_t b, int64_t n_out, int64_t n,
                          int64_t t0, sc_axis_plan *plan, int64_t e[2],
                          sc_error *err) {
  const int64_t rest = (n_out - t0 + n - 2) / (n - 1);
  return cached_input_extent(p, sizes, axis, b, b, b + t0, plan, &e[0],
                             err) ||
         cached_input_extent(p, sizes, axis, b, b + t0,
                             b + (t0 + rest < n_out ? t0 + rest : n_out),
                             plan, &e[1], err);
}

int _sc_tile_bounds(const sc_program *p, const int64_t *sizes, int axis,
                    int64_t t_out, int64_t tile_in, int cached,
                    sc_axis_plan *plan, int64_t *bounds, sc_error *err) {
  return _sc_tile_bounds_range(p, sizes, axis, 0,
                               sizes[2 * p->n_instr + axis], t_out, tile_in,
                               cached, plan, bounds, err);
}

/* See internal.h: _sc_tile_bounds over the output span [b, e) alone, in
 * absolute coordinates (bounds[0] = b, bounds[n] = e). */
int _sc_tile_bounds_range(const sc_program *p, const int64_t *sizes,
                          int axis, int64_t b, int64_t e_out, int64_t t_out,
                          int64_t tile_in, int cached, sc_axis_plan *plan,
                          int64_t *bounds, sc_error *err) {
  const int64_t n_out = e_out - b;
  const int64_t n = (n_out + t_out - 1) / t_out;
  if (b < 0 || n_out < 1 || e_out > sizes[2 * p->n_instr + axis])
    return sc_fail(err, "streamcnn: internal error: bad tile range");
  bounds[0] = b;
  if (!cached || n < 2) { /* tiles of t_out */
    for (int64_t k = 1; k <= n; k++)
      bounds[k] = b + (k * t_out < n_out ? k * t_out : n_out);
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
    if (first_and_next(p, sizes, axis, b, n_out, n, t0, plan, e, err))
      return SC_ERR;
    if (e[0] >= e[1] && e[1] <= tile_in)
      hi = t0;
    else
      lo = t0 + 1;
  }
  int64_t first = lo;
  if (lo > 1) { /* one less may read less at most */
    int64_t f[2];
    if (first_and_next(p, sizes, axis, b, n_out, n, lo, plan, e, err) ||
        first_and_next(p, sizes, axis, b, n_out, n, lo - 1, plan, f, err))
      return SC_ERR;
    if (f[1] <= tile_in && (f[0] > f[1] ? f[0] : f[1]) <
                               (e[0] > e[1] ? e[0] : e[1]))
      first = lo - 1;
  }
  /* the others of one size, the last the remainder (fewer distinct
   * shapes: the allocator reuses their buffers), or evenly where that
   * would leave the last empty */
  const int64_t rest = n_out - first, step = (rest + n - 2) / (n - 1);
  bounds[1] = b + first;
  for (int64_t k = 2; k <= n; k++)
    bounds[k] = b + first + (step * (n - 2) < rest
                             ? (k < n ? step * (k - 1) : rest)
                             : (rest * (k - 1) + (n - 2)) / (n - 1));
  return SC_OK;
}

/* See internal.h. */
int _sc_decode_and_tile(const int64_t *words, int64_t n_words, int64_t h,
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
  const int rc = _sc_decode_and_tile(words, n_words, h, w, tile_h, tile_w,
                                     &p, &sizes, t, &err);
  if (!rc)
    for (int a = 0; a < 2; a++) {
      const int64_t n = sizes[2 * p->n_instr + a];
      plan[a] = n;
      plan[2 + a] = t[a];
      plan[4 + a] = (n + t[a] - 1) / t[a];
    }
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  free(sizes);
  sc_program_free(p);
  return rc;
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
  int rc = _sc_decode_and_tile(words, n_words, h, w, tile_h, tile_w, &p,
                               &sizes, t, &err);
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
  if (rc) _sc_copy_err(&err, errbuf, errlen);
  sc_axis_plan_free(plan);
  free(sizes);
  sc_program_free(p);
  return rc;
}
