/*
 * fuzz_geometry.c — libFuzzer target: tiling geometry and plans.
 *
 * Input: fuzz_common.h's header (image and tile extents, flags) + program
 * words. For a program that decodes and an image it fits, the tiling is
 * built and checked along both axes:
 *   - the output tile edge is in [1, output extent] and its interior input
 *     extent fits the tile; sc_tiling_info agrees;
 *   - tile bounds (cone and cached) start at 0, increase strictly and end
 *     at the output extent;
 *   - every plan's spans lie inside their value, the output's span is the
 *     tile, every read span (clipped) lies inside the region it reads, a
 *     convolution reads only its own padding beyond the value;
 *   - cached plans: own is a suffix of region, and the own parts of the
 *     tiles partition [0, e_v) of every value v, e_v the end of v's span in
 *     the cone of the whole output.
 * Where both axes have at most MAX_TILES tiles, also (positions drawn
 * from the header's mask):
 *   - row bands (sc_band_info, as the *_rows ops run them): one band of
 *     every output row has the whole pass's cached work (sc_work_info);
 *     two bands splitting the rows read the image rows of their cones
 *     (within sc_cone_info's, clipped), each at most that work;
 *   - restricted plans (_sc_plan_restrict, the sparse backward): for a
 *     cached tile and seed boxes inside its values, every value's region
 *     holds its seed and lies in the tile's region, its own span in both,
 *     and every read of an own span lies in the region it reads.
 * Extents go up to 2^31 (flags bit 0): the arithmetic must not overflow
 * (UBSan traps). Axes with more than MAX_TILES tiles are checked on a
 * sample of tiles (every tile would take minutes).
 */
#include <math.h>

#include "fuzz_common.h"
#include "internal.h"

#define MAX_TILES 256

static int64_t clip_lo(int64_t x) { return x < 0 ? 0 : x; }
static int64_t clip_hi(int64_t x, int64_t n) { return x > n ? n : x; }

static void check_plan(const sc_program *p, const int64_t *sizes, int axis,
                       int64_t lo, int64_t hi, const sc_axis_plan *pl,
                       int cached) {
  const int64_t nv = p->n_instr + 1;
  for (int64_t v = 0; v < nv; v++) {
    const int64_t n = sizes[2 * v + axis];
    const int64_t *rg = &pl->region[2 * v], *ow = &pl->own[2 * v];
    if (rg[1] > rg[0]) FZ_CHECK(rg[0] >= 0 && rg[1] <= n);
    if (ow[1] > ow[0]) {
      FZ_CHECK(ow[0] >= 0 && ow[1] <= n);
      FZ_CHECK(ow[0] >= rg[0] && ow[1] <= rg[1]);
      if (cached) FZ_CHECK(ow[1] == rg[1]);
    }
    if (!cached) FZ_CHECK(ow[0] == rg[0] && ow[1] == rg[1]);
  }
  const int64_t *out = cached ? &pl->own[2 * p->n_instr]
                              : &pl->region[2 * p->n_instr];
  FZ_CHECK(out[0] == lo && out[1] == hi);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int64_t *o = cached ? &pl->own[2 * (i + 1)]
                              : &pl->region[2 * (i + 1)];
    for (int j = 0; j < in->n_in; j++) {
      const int64_t *rd = &pl->read[4 * i + 2 * j];
      const int64_t u = in->in[j], n = sizes[2 * u + axis];
      if (o[1] <= o[0]) {
        FZ_CHECK(rd[1] <= rd[0]);
        continue;
      }
      int64_t e0, e1; /* the read span, recomputed with checked arithmetic */
      if (_sc_is_window(in->op)) {
        const sc_window *w = &in->win[axis];
        int64_t a, b, c;
        FZ_CHECK(!__builtin_mul_overflow(o[0], w->s, &a) &&
                 !__builtin_sub_overflow(a, w->pad_lo, &e0));
        FZ_CHECK(!__builtin_mul_overflow(o[1] - 1, w->s, &b) &&
                 !__builtin_mul_overflow(w->d, w->k - 1, &c) &&
                 !__builtin_add_overflow(b - w->pad_lo, c + 1, &e1));
        FZ_CHECK(e0 >= -w->pad_lo);
        if (!w->ceil_mode) FZ_CHECK(e1 <= n + w->pad_hi);
        else FZ_CHECK(e0 < n + w->pad_lo);
      } else {
        e0 = o[0];
        e1 = o[1];
        FZ_CHECK(e0 >= 0 && e1 <= n);
      }
      FZ_CHECK(rd[0] == e0 && rd[1] == e1);
      const int64_t c0 = clip_lo(e0), c1 = clip_hi(e1, n);
      if (c1 > c0) {
        const int64_t *rg = &pl->region[2 * u];
        FZ_CHECK(rg[0] <= c0 && c1 <= rg[1]);
      }
    }
  }
}

static void check_axis(const sc_program *p, const int64_t *sizes, int axis,
                       int64_t t_out, int64_t tile_in, sc_axis_plan *pl,
                       sc_axis_plan *full) {
  sc_error err = {0};
  const int64_t nv = p->n_instr + 1;
  const int64_t n_out = sizes[2 * p->n_instr + axis];
  FZ_CHECK(t_out >= 1 && t_out <= n_out);
  const int64_t ext = sc_input_extent(p, axis, t_out);
  FZ_CHECK(ext >= 1 && ext <= tile_in);
  const int64_t count = (n_out + t_out - 1) / t_out;
  if (count > MAX_TILES) { /* a sample of cone tiles */
    const int64_t ks[] = {0, 1, count / 2, count - 2, count - 1};
    for (int q = 0; q < 5; q++) {
      const int64_t lo = ks[q] * t_out;
      const int64_t hi = lo + t_out < n_out ? lo + t_out : n_out;
      FZ_CHECK(sc_plan_axis(p, sizes, axis, lo, hi, pl, &err) == SC_OK);
      check_plan(p, sizes, axis, lo, hi, pl, 0);
    }
    return;
  }
  /* the cone of the whole output: e_v */
  FZ_CHECK(sc_plan_axis(p, sizes, axis, 0, n_out, full, &err) == SC_OK);
  int64_t *bounds = malloc((size_t)(count + 1) * sizeof *bounds);
  int64_t *end = malloc((size_t)nv * sizeof *end);
  FZ_CHECK(bounds && end);
  for (int cached = 0; cached < 2; cached++) {
    FZ_CHECK(_sc_tile_bounds(p, sizes, axis, t_out, tile_in, cached, pl,
                             bounds, &err) == SC_OK);
    FZ_CHECK(bounds[0] == 0 && bounds[count] == n_out);
    for (int64_t k = 0; k < count; k++) FZ_CHECK(bounds[k] < bounds[k + 1]);
    for (int64_t v = 0; v < nv; v++) end[v] = 0;
    for (int64_t k = 0; k < count; k++) {
      const int64_t lo = bounds[k], hi = bounds[k + 1];
      if (cached) {
        FZ_CHECK(sc_plan_axis_cached(p, sizes, axis, lo, hi, pl, &err) ==
                 SC_OK);
      } else {
        FZ_CHECK(sc_plan_axis(p, sizes, axis, lo, hi, pl, &err) == SC_OK);
      }
      check_plan(p, sizes, axis, lo, hi, pl, cached);
      if (!cached) {
        /* a cone tile computes at least what the cached tile owns and at
         * most the whole cone's span */
        for (int64_t v = 0; v < nv; v++) {
          const int64_t *rg = &pl->region[2 * v], *f = &full->region[2 * v];
          if (rg[1] > rg[0]) FZ_CHECK(f[0] <= rg[0] && rg[1] <= f[1]);
        }
        continue;
      }
      for (int64_t v = 0; v < nv; v++) { /* own parts follow each other */
        const int64_t *ow = &pl->own[2 * v];
        if (ow[1] <= ow[0]) continue;
        FZ_CHECK(ow[0] == end[v]);
        end[v] = ow[1];
      }
    }
    if (cached)
      for (int64_t v = 0; v < nv; v++) {
        const int64_t *f = &full->region[2 * v];
        FZ_CHECK(end[v] == (f[1] > f[0] ? f[1] : 0));
        if (f[1] > f[0]) FZ_CHECK(f[0] == 0);
      }
  }
  free(bounds);
  free(end);
}

/* splitmix64: positions drawn from the header's mask */
static uint64_t fz_next(uint64_t *x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* a non-empty span inside [lo, hi) (hi > lo) */
static void fz_span(uint64_t *x, int64_t lo, int64_t hi, int64_t *s) {
  const uint64_t n = (uint64_t)(hi - lo);
  const int64_t a = lo + (int64_t)(fz_next(x) % n);
  s[0] = a;
  s[1] = a + 1 + (int64_t)(fz_next(x) % (uint64_t)(hi - a));
}

static void check_bands(const int64_t *words, int64_t n, const fz_params *q,
                        const sc_program *p, const int64_t *sizes,
                        sc_axis_plan *pl, uint64_t *x) {
  sc_error err = {0};
  char msg[256];
  const int64_t out_h = sizes[2 * p->n_instr];
  double whole[SC_WORK_WORDS], one[SC_BAND_WORDS], b[2][SC_BAND_WORDS];
  FZ_CHECK(sc_work_info(words, n, q->h, q->w, q->tile_h, q->tile_w, whole,
                        msg, sizeof msg) == SC_OK);
  FZ_CHECK(sc_band_info(words, n, q->h, q->w, q->tile_h, q->tile_w, 0,
                        out_h, one, msg, sizeof msg) == SC_OK);
  FZ_CHECK(one[2] >= 0.0 && one[3] >= 0.0);
  FZ_CHECK(fabs(one[3] - whole[4]) <= 1e-12 * whole[4]);
  /* bad bands are refused */
  FZ_CHECK(sc_band_info(words, n, q->h, q->w, q->tile_h, q->tile_w, 0,
                        out_h + 1, one, msg, sizeof msg) == SC_ERR);
  FZ_CHECK(sc_band_info(words, n, q->h, q->w, q->tile_h, q->tile_w, out_h,
                        out_h, one, msg, sizeof msg) == SC_ERR);
  if (out_h < 2) return;
  const int64_t cut = 1 + (int64_t)(fz_next(x) % (uint64_t)(out_h - 1));
  const int64_t lo[2] = {0, cut}, hi[2] = {cut, out_h};
  for (int k = 0; k < 2; k++) {
    int64_t box[SC_CONE_WORDS];
    FZ_CHECK(sc_band_info(words, n, q->h, q->w, q->tile_h, q->tile_w, lo[k],
                          hi[k], b[k], msg, sizeof msg) == SC_OK);
    FZ_CHECK(sc_cone_info(words, n, lo[k], hi[k], 0, 1, box, msg,
                          sizeof msg) == SC_OK);
    /* the image rows of the cone through the values' extents (padding
     * cut off at every value), within the unclipped cone */
    FZ_CHECK(sc_plan_axis(p, sizes, 0, lo[k], hi[k], pl, &err) == SC_OK);
    FZ_CHECK(b[k][0] == (double)pl->region[0] &&
             b[k][1] == (double)pl->region[1]);
    if (b[k][0] < b[k][1]) /* empty: rows made of padding alone */
      FZ_CHECK(clip_lo(box[0]) <= pl->region[0] &&
               pl->region[1] <= clip_hi(box[1], q->h));
    FZ_CHECK(b[k][2] >= 0.0 && b[k][3] >= 0.0);
  }
  if (b[0][0] < b[0][1] && b[1][0] < b[1][1])
    FZ_CHECK(b[0][0] <= b[1][0] && b[0][1] <= b[1][1]);
  /* each band computes a part of every value's whole cone (a hull: the
   * two parts may leave out rows no output row needs, so together they
   * may do less) */
  FZ_CHECK(b[0][3] <= whole[4] * (1.0 + 1e-12) &&
           b[1][3] <= whole[4] * (1.0 + 1e-12));
}

static void check_restrict(const sc_program *p, const int64_t *sizes,
                           const int64_t t[2], const int64_t tile[2],
                           uint64_t *x) {
  sc_error err = {0};
  const int64_t nv = p->n_instr + 1;
  sc_axis_plan *full[2] = {sc_axis_plan_new(p), sc_axis_plan_new(p)};
  sc_axis_plan *out[2] = {sc_axis_plan_new(p), sc_axis_plan_new(p)};
  int64_t *seed = calloc(4 * (size_t)nv, sizeof *seed);
  FZ_CHECK(full[0] && full[1] && out[0] && out[1] && seed);
  for (int a = 0; a < 2; a++) { /* a random cached tile along each axis */
    const int64_t n_out = sizes[2 * p->n_instr + a];
    const int64_t count = (n_out + t[a] - 1) / t[a];
    int64_t *bounds = malloc((size_t)(count + 1) * sizeof *bounds);
    FZ_CHECK(bounds);
    FZ_CHECK(_sc_tile_bounds(p, sizes, a, t[a], tile[a], 1, full[a], bounds,
                             &err) == SC_OK);
    const int64_t k = (int64_t)(fz_next(x) % (uint64_t)count);
    FZ_CHECK(sc_plan_axis_cached(p, sizes, a, bounds[k], bounds[k + 1],
                                 full[a], &err) == SC_OK);
    free(bounds);
  }
  /* seeds: a box in the output's own part, and in up to two other values */
  for (int q = 0; q < 3; q++) {
    const int64_t v = q ? (int64_t)(fz_next(x) % (uint64_t)nv) : nv - 1;
    const int64_t *rr = q ? &full[0]->region[2 * v] : &full[0]->own[2 * v];
    const int64_t *rc = q ? &full[1]->region[2 * v] : &full[1]->own[2 * v];
    if (rr[1] <= rr[0] || rc[1] <= rc[0]) continue;
    fz_span(x, rr[0], rr[1], &seed[4 * v]);
    fz_span(x, rc[0], rc[1], &seed[4 * v + 2]);
  }
  FZ_CHECK(_sc_plan_restrict(p, sizes, (const sc_axis_plan *const *)full,
                             seed, out, &err) == SC_OK);
  for (int64_t v = 0; v < nv; v++) {
    const int64_t *sd = &seed[4 * v];
    const int seeded = sd[1] > sd[0] && sd[3] > sd[2];
    for (int a = 0; a < 2; a++) {
      const int64_t *rg = &out[a]->region[2 * v], *ow = &out[a]->own[2 * v];
      const int64_t *fr = &full[a]->region[2 * v], *fo = &full[a]->own[2 * v];
      if (seeded) FZ_CHECK(rg[0] <= sd[2 * a] && sd[2 * a + 1] <= rg[1]);
      if (rg[1] > rg[0]) FZ_CHECK(fr[0] <= rg[0] && rg[1] <= fr[1]);
      if (ow[1] > ow[0])
        FZ_CHECK(rg[0] <= ow[0] && ow[1] <= rg[1] && fo[0] <= ow[0] &&
                 ow[1] <= fo[1]);
    }
  }
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int64_t *o[2] = {&out[0]->own[2 * (i + 1)],
                           &out[1]->own[2 * (i + 1)]};
    if (o[0][1] <= o[0][0] || o[1][1] <= o[1][0]) continue;
    for (int j = 0; j < in->n_in; j++) {
      /* the read box clipped to the input (empty: all of it padding) */
      const int64_t u = in->in[j];
      int64_t c[4];
      for (int a = 0; a < 2; a++) {
        const int64_t *rd = &out[a]->read[4 * i + 2 * j];
        FZ_CHECK(rd[1] > rd[0]);
        c[2 * a] = clip_lo(rd[0]);
        c[2 * a + 1] = clip_hi(rd[1], sizes[2 * u + a]);
      }
      if (c[1] <= c[0] || c[3] <= c[2]) continue;
      for (int a = 0; a < 2; a++) {
        const int64_t *rg = &out[a]->region[2 * u];
        FZ_CHECK(rg[0] <= c[2 * a] && c[2 * a + 1] <= rg[1]);
      }
    }
  }
  for (int a = 0; a < 2; a++) {
    sc_axis_plan_free(full[a]);
    sc_axis_plan_free(out[a]);
  }
  free(seed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_params q;
  if (!fz_params_read(data, size, &q)) return 0;
  int64_t n;
  int64_t *words = fz_words(data + FZ_HEADER, size - FZ_HEADER, &n);
  sc_program *p = NULL;
  sc_error err = {0};
  if (!words || sc_program_decode(words, n, &p, &err)) {
    free(words);
    return 0;
  }
  const int64_t nv = p->n_instr + 1;
  int64_t *sizes = malloc(2 * (size_t)nv * sizeof *sizes);
  sc_axis_plan *pl = sc_axis_plan_new(p), *full = sc_axis_plan_new(p);
  FZ_CHECK(sizes && pl && full);
  int64_t t[2], info[SC_PLAN_WORDS];
  char msg[256];
  const int rc_info = sc_tiling_info(words, n, q.h, q.w, q.tile_h, q.tile_w,
                                     info, msg, sizeof msg);
  if (sc_value_sizes(p, q.h, q.w, sizes, &err) == SC_OK) {
    /* padding may grow a value past the image (<= 8192 per instruction) */
    for (int64_t v = 0; v < 2 * nv; v++)
      FZ_CHECK(sizes[v] >= 1 && sizes[v] <= SC_MAX_EXTENT + 8192 * v);
    if (_sc_tiling(p, sizes, q.tile_h, q.tile_w, t, &err) == SC_OK) {
      FZ_CHECK(rc_info == SC_OK);
      const int64_t tile[2] = {q.tile_h, q.tile_w};
      int few = 1;
      for (int a = 0; a < 2; a++) {
        const int64_t n_out = sizes[2 * p->n_instr + a];
        FZ_CHECK(info[a] == n_out && info[2 + a] == t[a] &&
                 info[4 + a] == (n_out + t[a] - 1) / t[a]);
        check_axis(p, sizes, a, t[a], tile[a], pl, full);
        few &= info[4 + a] <= MAX_TILES;
      }
      if (few) {
        uint64_t x = q.mask;
        check_bands(words, n, &q, p, sizes, pl, &x);
        check_restrict(p, sizes, t, tile, &x);
      }
    } else {
      FZ_CHECK(rc_info == SC_ERR && err.set);
    }
  } else {
    FZ_CHECK(rc_info == SC_ERR && err.set);
  }
  sc_axis_plan_free(pl);
  sc_axis_plan_free(full);
  free(sizes);
  sc_program_free(p);
  free(words);
  return 0;
}
