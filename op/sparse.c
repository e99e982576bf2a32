/*
 * sparse.c — the exact sparse backward: a tile's backward runs only where
 * its output gradient (or a gradient pending for it from the tiles after
 * it) is non-zero. Zeros contribute nothing, so each tile is
 *   - skipped (no recompute, no backward) when its output-gradient block is
 *     all zeros and nothing non-zero is pending for it;
 *   - else, when nothing is pending and it is cheaper, back-propagated
 *     through the cones of a few boxes of its output that hold all its
 *     non-zeros (cone plans: each box recomputes its own cone from the
 *     image, as a tile of halo_cache=False, and leaves nothing pending);
 *   - else, with halo caching, restricted: its cached plans cut down to
 *     the cone of the box around its non-zero output gradient joined, value
 *     by value, with the boxes around its non-zero pending gradients
 *     (_sc_plan_restrict); it recomputes and back-propagates only there,
 *     takes the halo parts from the strips and passes on only their
 *     gradient;
 *   - else run whole, as without sparsity.
 * Exact by the linearity argument of the tiling itself: the boxes'
 * non-zeros partition the tile's, and every non-zero is back-propagated
 * once (a restricted tile drops only zeros). Rounding differs from the
 * whole tile's only in the order of the sums inside the ATen ops (spans of
 * another size) and of the weight gradients' sums; skipping alone changes
 * nothing.
 *
 * Mode (STREAMCNN_SPARSE_BACKWARD): unset, "1": skip, boxes and restricted
 * tiles; "skip": skip only; "0": off (every tile whole, as before).
 *
 * Owns: r->box_plan (released by _sc_run_release), the tile counters
 * (sc_backward_tiles). Calls: run.c, halo.c (pending spans, halo views),
 * backward.c (_sc_backward_tile), aten.c (_sc_nonzero_map), geometry.c
 * (_sc_plan_restrict). Called by replay.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Boxes tried per tile at most (the clustering is quadratic in them). */
#define BOX_MAX 64

/* ---- counters ------------------------------------------------------------ */

/* Process-wide, as sc_macs: whole, boxed and skipped backward tiles, the
 * boxes the boxed ones ran, restricted tiles (indexed by SC_TILE_*). */
static _Atomic double g_tiles[5];

void sc_backward_tiles(double out[5], int reset) {
  _sc_counters_read(g_tiles, 5, out, reset);
}

static void count(int k, double n) { _sc_counter_add(&g_tiles[k], n); }

/* ---- mode ---------------------------------------------------------------- */

int _sc_sparse_mode(sc_ctx *ctx, int *mode) {
  const char *s = getenv("STREAMCNN_SPARSE_BACKWARD");
  if (!s || !*s || !strcmp(s, "1") || !strcmp(s, "on")) {
    *mode = SC_SPARSE_BOXES;
  } else if (!strcmp(s, "skip")) {
    *mode = SC_SPARSE_SKIP;
  } else if (!strcmp(s, "0") || !strcmp(s, "off")) {
    *mode = SC_SPARSE_OFF;
  } else {
    *mode = SC_SPARSE_OFF;
    return sc_fail(&ctx->err,
                   "streamcnn: STREAMCNN_SPARSE_BACKWARD must be 1 (skip "
                   "zero tiles and back-propagate boxes), skip or 0 (off), "
                   "got '%.40s'",
                   s);
  }
  return SC_OK;
}

/* ---- non-zeros ----------------------------------------------------------- */

/* Whether t (4-D, any strides) holds a non-zero (NaN counts) and, when
 * map is given, the h x w map of its pixels that do (over batch and
 * channels; owned by the caller, host memory). */
static int nonzeros(sc_run *r, AtenTensorHandle t, int *any,
                    unsigned char **map, int64_t *h, int64_t *w) {
  AtenTensorHandle m = NULL;
  int64_t dim, *sz, *st;
  void *data = NULL;
  *any = 0;
  if (map) *map = NULL;
  if (_sc_nonzero_map(r->ctx, t, &m)) return SC_ERR;
  if (_sc_meta(r->ctx, m, &dim, &sz, &st) ||
      aoti_torch_get_data_ptr(m, &data)) {
    _sc_drop(&m);
    return sc_fail(&r->ctx->err, "streamcnn: cannot read a non-zero map");
  }
  const int64_t n = sz[0] * sz[1];
  const unsigned char *px = data;
  for (int64_t k = 0; k < n && !*any; k++) *any = px[k] != 0;
  if (map && *any) {
    *map = malloc((size_t)n);
    if (!*map) {
      _sc_drop(&m);
      return sc_fail(&r->ctx->err, "streamcnn: out of memory");
    }
    memcpy(*map, px, (size_t)n);
    *h = sz[0];
    *w = sz[1];
  }
  _sc_drop(&m);
  return SC_OK;
}

/* Every one of the n entries of map is set. */
static int all_set(const unsigned char *map, int64_t n) {
  for (int64_t k = 0; k < n; k++)
    if (!map[k]) return 0;
  return 1;
}

/* ---- boxes --------------------------------------------------------------- */

typedef struct box {
  int64_t r0, r1, c0, c1; /* output rows and cols, half-open, absolute */
} box;

/* Input pixels the cone of b reads, unclipped: the clustering's cost.
 * ext[a][t]: sc_input_extent of t output rows (a = 0) or cols (a = 1). */
static double box_cost(double *const ext[2], const box *b) {
  return ext[0][b->r1 - b->r0] * ext[1][b->c1 - b->c0];
}

static box hull(const box *a, const box *b) {
  box h = *a;
  if (b->r0 < h.r0) h.r0 = b->r0;
  if (b->r1 > h.r1) h.r1 = b->r1;
  if (b->c0 < h.c0) h.c0 = b->c0;
  if (b->c1 > h.c1) h.c1 = b->c1;
  return h;
}

/* The bounding box of the non-zeros of map (h x w, at row0, col0), and
 * how many there are (*nnz). */
static box map_box(const unsigned char *map, int64_t h, int64_t w,
                   int64_t row0, int64_t col0, int64_t *nnz) {
  box b = {INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
  *nnz = 0;
  for (int64_t y = 0; y < h; y++)
    for (int64_t x = 0; x < w; x++)
      if (map[y * w + x]) {
        const box px = {row0 + y, row0 + y + 1, col0 + x, col0 + x + 1};
        b = hull(&b, &px);
        ++*nnz;
      }
  return b;
}

/* seed[0 .. 3] (rows, cols; {0, 0, 0, 0} empty) = its hull with b. */
static void seed_hull(int64_t *seed, const box *b) {
  if (b->r1 <= b->r0 || b->c1 <= b->c0) return;
  box s = {seed[0], seed[1], seed[2], seed[3]};
  if (seed[1] > seed[0] && seed[3] > seed[2]) s = hull(&s, b);
  else s = *b;
  seed[0] = s.r0;
  seed[1] = s.r1;
  seed[2] = s.c0;
  seed[3] = s.c1;
}

/* Cached plans: whether a non-zero gradient is pending for the current
 * tile (from the row below, over its own columns, or from the tile on its
 * right); with seed, also the box around each value's (seed[4 v ..], as
 * for _sc_plan_restrict). */
static int pending(sc_run *r, int64_t *seed, int *any) {
  *any = 0;
  for (int64_t v = 1; v < r->nv && (seed || !*any); v++)
    for (int left = 0; left < 2; left++) {
      AtenTensorHandle g = left ? r->gleft[v] : r->gband[v], t = NULL;
      unsigned char *map = NULL;
      int64_t ps[2][2], h = 0, w = 0;
      int nz = 0;
      if (!g) continue;
      _sc_pending_span(r, v, left, ps[0], ps[1]);
      if (empty(ps[0]) || empty(ps[1])) continue;
      int64_t dim, *sz, *st;
      if (left ? aoti_torch_new_tensor_handle(g, &t) != 0
               : (_sc_meta(r->ctx, g, &dim, &sz, &st) ||
                  _sc_view(r->ctx, g, 0, sz[2], ps[1][0],
                           ps[1][1] - ps[1][0], &t)))
        return sc_fail(&r->ctx->err, "streamcnn: cannot view a halo gradient");
      const int rc = nonzeros(r, t, &nz, seed ? &map : NULL, &h, &w);
      _sc_drop(&t);
      if (rc) return SC_ERR;
      if (nz && seed) {
        int64_t nnz;
        const box b = map_box(map, h, w, ps[0][0], ps[1][0], &nnz);
        seed_hull(&seed[4 * v], &b);
      }
      free(map);
      *any |= nz;
    }
  return SC_OK;
}

static int overlap(const box *a, const box *b) {
  return a->r0 < b->r1 && b->r0 < a->r1 && a->c0 < b->c1 && b->c0 < a->c1;
}

/* Boxes holding the non-zeros of map (h x w, the output span starting at
 * row0, col0): the bounding boxes of the non-zeros in each cell of a grid,
 * its cells 1 x 1 or as small a power of 2 as leaves at most BOX_MAX
 * boxes; merged greedily while a hull costs no more than its two parts,
 * then merged until none overlap (so that every non-zero lies in exactly
 * one box). Returns the number of boxes in b (room for BOX_MAX), -1 when
 * out of memory. */
static int64_t cluster(const sc_program *p, const unsigned char *map,
                       int64_t h, int64_t w, int64_t row0, int64_t col0,
                       box *b) {
  static const box none = {INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
  box *cell = malloc((size_t)(h * w) * sizeof *cell);
  double *ext[2] = {malloc((size_t)(h + 1) * sizeof(double)),
                    malloc((size_t)(w + 1) * sizeof(double))};
  int64_t n = 0;
  if (!cell || !ext[0] || !ext[1]) {
    free(cell);
    free(ext[0]);
    free(ext[1]);
    return -1;
  }
  for (int a = 0; a < 2; a++)
    for (int64_t t = 1; t <= (a ? w : h); t++)
      ext[a][t] = (double)sc_input_extent(p, a, t);
  for (int64_t e = 1;; e *= 2) {
    const int64_t gh = (h + e - 1) / e, gw = (w + e - 1) / e;
    for (int64_t k = 0; k < gh * gw; k++) cell[k] = none;
    for (int64_t y = 0; y < h; y++)
      for (int64_t x = 0; x < w; x++)
        if (map[y * w + x]) {
          const box px = {row0 + y, row0 + y + 1, col0 + x, col0 + x + 1};
          box *c = &cell[(y / e) * gw + x / e];
          *c = hull(c, &px);
        }
    n = 0;
    for (int64_t k = 0; k < gh * gw; k++)
      if (cell[k].r0 < cell[k].r1 && n++ < BOX_MAX) b[n - 1] = cell[k];
    if (n <= BOX_MAX) break;
  }
  free(cell);
  for (;;) { /* greedy: the merge that saves most, while one saves */
    int64_t bi = -1, bj = -1;
    double best = 0.0;
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = i + 1; j < n; j++) {
        const box m = hull(&b[i], &b[j]);
        const double gain =
            box_cost(ext, &b[i]) + box_cost(ext, &b[j]) - box_cost(ext, &m);
        if (gain >= best) {
          best = gain;
          bi = i;
          bj = j;
        }
      }
    if (bi < 0) break;
    b[bi] = hull(&b[bi], &b[bj]);
    b[bj] = b[--n];
  }
  for (int merged = 1; merged;) { /* no box may hold another's non-zeros */
    merged = 0;
    for (int64_t i = 0; i < n && !merged; i++)
      for (int64_t j = i + 1; j < n && !merged; j++)
        if (overlap(&b[i], &b[j])) {
          b[i] = hull(&b[i], &b[j]);
          b[j] = b[--n];
          merged = 1;
        }
  }
  free(ext[0]);
  free(ext[1]);
  return n;
}

/* Elements the current plans compute (computed = 1: own spans, what a
 * cached tile computes itself; cone plans: their regions) or hold
 * (computed = 0: regions, a cached tile's halos included). */
static double plans_size(const sc_run *r, int computed) {
  double total = 0.0;
  for (int64_t v = 0; v < r->nv; v++) {
    const int64_t *a = computed ? own(r, 0, v) : region(r, 0, v);
    const int64_t *b = computed ? own(r, 1, v) : region(r, 1, v);
    if (!empty(a) && !empty(b))
      total += (double)(a[1] - a[0]) * (double)(b[1] - b[0]) *
               (double)r->p->channels[v];
  }
  return total;
}

/* Make the cone plans of box b current (b: absolute output spans). */
static int select_box(sc_run *r, const box *b) {
  const sc_program *p = r->p;
  if (sc_plan_axis(p, r->sizes, 0, b->r0, b->r1, r->box_plan[0],
                   &r->ctx->err) ||
      sc_plan_axis(p, r->sizes, 1, b->c0, b->c1, r->box_plan[1],
                   &r->ctx->err))
    return SC_ERR;
  r->cur[0] = r->box_plan[0];
  r->cur[1] = r->box_plan[1];
  return SC_OK;
}

/* Make the tile's cached plans (tile) restricted to seed current. */
static int select_restricted(sc_run *r, const sc_axis_plan *const tile[2],
                             const int64_t *seed) {
  if (_sc_plan_restrict(r->p, r->sizes, tile, seed, r->box_plan,
                        &r->ctx->err))
    return SC_ERR;
  r->cur[0] = r->box_plan[0];
  r->cur[1] = r->box_plan[1];
  return SC_OK;
}

/* ---- the tile ------------------------------------------------------------ */

/* What back-propagating the output gradient in the boxes b[0 .. n) costs
 * (what their cone plans compute: *boxes) against running the tile (*run):
 * without halo caching the whole tile; with it the plans restricted to
 * the output gradient's box (seed: zeros, scratch), whose own spans it
 * computes, and when
 * their halos hold part of the cone, the tiles before compute that part
 * from the gradient passed on, which they might have skipped: about the
 * cone of the boxes' hull then, at most the whole tile's (as many tiles
 * around hold non-zeros as not), unless the gradient is dense (its
 * neighbours run anyway). The tile's own plans are current again after. */
static int costs(sc_run *r, const box *b, int64_t n, int64_t *seed,
                 int dense, double *boxes, double *run) {
  const sc_axis_plan *tile[2] = {r->cur[0], r->cur[1]};
  box all = b[0];
  int rc = SC_OK;
  const double whole = plans_size(r, 1);
  *boxes = 0.0;
  *run = whole;
  for (int64_t k = 0; !rc && k < n; k++) {
    all = hull(&all, &b[k]);
    if (!(rc = select_box(r, &b[k]))) *boxes += plans_size(r, 1);
  }
  if (!rc && seed) {
    seed_hull(&seed[4 * r->p->n_instr], &all); /* the output's box alone */
    rc = select_restricted(r, tile, seed);
  }
  if (!rc && seed) {
    const double computed = plans_size(r, 1), held = plans_size(r, 0);
    *run = computed;
    if (held > computed && !dense && !(rc = select_box(r, &all))) {
      const double cone = plans_size(r, 1);
      *run = cone < whole ? cone : whole;
    }
  }
  r->cur[0] = tile[0];
  r->cur[1] = tile[1];
  return rc;
}

/* Back-propagate boxes b[0 .. n) of the current tile, each as a tile of
 * its own (cone plans, no halo, nothing pending). */
static int run_boxes(sc_run *r, AtenTensorHandle grad_out, const box *b,
                     int64_t n) {
  const sc_axis_plan *tile[2] = {r->cur[0], r->cur[1]};
  const int cached = r->cached;
  int rc = SC_OK;
  r->cached = 0;
  for (int64_t k = 0; !rc && k < n; k++) {
    rc = select_box(r, &b[k]) || _sc_backward_tile(r, grad_out);
    _sc_run_tile_release(r);
  }
  r->cached = cached;
  r->cur[0] = tile[0];
  r->cur[1] = tile[1];
  return rc;
}

/* The same spans for every value and instruction input. */
static int same_plan(const sc_axis_plan *a, const sc_axis_plan *b,
                     int64_t n_instr) {
  const size_t nv = (size_t)a->n_values;
  return !memcmp(a->region, b->region, 2 * nv * sizeof *a->region) &&
         !memcmp(a->own, b->own, 2 * nv * sizeof *a->own) &&
         !memcmp(a->read, b->read, 4 * (size_t)n_instr * sizeof *a->read);
}

/* The current cached tile, restricted to seed: its halos narrowed, the
 * pending gradients added and the halos' passed on (_sc_pass_pending).
 * *ran = 0: nothing restricted it (the caller runs it whole). */
static int run_restricted(sc_run *r, AtenTensorHandle grad_out,
                          const int64_t *seed, int *ran) {
  const sc_axis_plan *tile[2] = {r->cur[0], r->cur[1]};
  int rc = select_restricted(r, tile, seed);
  *ran = !rc && !(same_plan(tile[0], r->cur[0], r->p->n_instr) &&
                  same_plan(tile[1], r->cur[1], r->p->n_instr));
  if (*ran) rc = _sc_halo_views(r) || _sc_backward_tile(r, grad_out);
  r->cur[0] = tile[0];
  r->cur[1] = tile[1];
  return rc;
}

int _sc_sparse_tile(sc_run *r, AtenTensorHandle grad_out, int mode,
                    int *how) {
  const int64_t ov = r->p->n_instr;
  /* the output gradient this tile back-propagates: its own span's */
  const int64_t *rs = own(r, 0, ov), *cs = own(r, 1, ov);
  /* cached: restricted tiles, seeded with the boxes around the non-zero
   * output and pending gradients */
  const int restrict_ = r->cached && mode == SC_SPARSE_BOXES;
  AtenTensorHandle g = NULL;
  unsigned char *map = NULL;
  int64_t *seed = NULL, *scratch = NULL; /* 4 per value each */
  box b[BOX_MAX];
  int any = 0, pend = 0, rc = SC_OK;
  int64_t h = 0, w = 0, n = 0;
  *how = SC_TILE_WHOLE;
  if (mode == SC_SPARSE_OFF || empty(rs) || empty(cs)) goto counted;
  if (_sc_view(r->ctx, grad_out, rs[0] - r->out_row0, /* a band's rows */
               rs[1] - rs[0], cs[0], cs[1] - cs[0], &g))
    goto fail;
  rc = nonzeros(r, g, &any, mode == SC_SPARSE_BOXES ? &map : NULL, &h, &w);
  _sc_drop(&g);
  if (rc) goto fail;
  /* A non-zero output gradient and no boxes to try (skip mode), or one
   * non-zero at every pixel (no boxes cost less than the tile, and the
   * restriction's hull is the whole tile): the tile runs whole, whatever
   * its pending gradients; their scan (two ATen calls per halo strip, a
   * device sync each on a GPU) is not needed. */
  if (any && (mode != SC_SPARSE_BOXES || all_set(map, h * w))) goto counted;
  if (restrict_ && !(seed = calloc(8 * (size_t)r->nv, sizeof *seed))) {
    sc_fail(&r->ctx->err, "streamcnn: out of memory");
    goto fail;
  }
  scratch = seed ? seed + 4 * r->nv : NULL;
  if (r->cached && pending(r, seed, &pend)) goto fail;
  if (pend && !restrict_) goto counted; /* the halo's gradient needs the
                                           cached tile */
  if (!any && !pend) {
    *how = SC_TILE_SKIPPED;
    goto counted;
  }
  if (mode != SC_SPARSE_BOXES) goto counted;
  n = any ? cluster(r->p, map, h, w, rs[0], cs[0], b) : 0;
  if (n < 0) {
    sc_fail(&r->ctx->err, "streamcnn: out of memory");
    goto fail;
  }
  for (int a = 0; a < 2; a++)
    if (!r->box_plan[a] && !(r->box_plan[a] = sc_axis_plan_new(r->p))) {
      sc_fail(&r->ctx->err, "streamcnn: out of memory");
      goto fail;
    }
  double boxes = 0.0, run = 0.0;
  if (n > 0) { /* the output gradient's boxes, or the tile run */
    int64_t nnz = 0;
    const box ob = map_box(map, h, w, rs[0], cs[0], &nnz);
    const int dense = 4 * nnz >= h * w;
    if (costs(r, b, n, scratch, dense, &boxes, &run)) goto fail;
    /* ties: boxes pass nothing on, unless the tile runs anyway for its
     * pending gradients and its own is dense */
    if (boxes < run || (seed && boxes == run && !(pend && dense))) {
      if (run_boxes(r, grad_out, b, n)) goto fail;
      count(3, (double)n);
      *how = SC_TILE_BOXED;
    } else if (seed) {
      seed_hull(&seed[4 * ov], &ob);
    }
  }
  free(map);
  map = NULL;
  if (seed && (pend || *how != SC_TILE_BOXED)) {
    /* the rest restricted: pending gradients, the output's unless boxed */
    int ran = 0;
    if (run_restricted(r, grad_out, seed, &ran)) goto fail;
    if (ran) *how = SC_TILE_RESTRICTED;
  }
counted:
  if ((*how == SC_TILE_BOXED || *how == SC_TILE_SKIPPED) && r->cached)
    _sc_drop_all(r->gleft, r->nv); /* nothing passes on */
  count(*how, 1.0);
  free(map);
  free(seed);
  return SC_OK;
fail:
  free(map);
  free(seed);
  return SC_ERR;
}
