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
 *   - else run whole, as without sparsity.
 * Exact by the linearity argument of the tiling itself: the boxes'
 * non-zeros partition the tile's, and every non-zero is back-propagated
 * once. Rounding differs from the whole tile's only in the order of the
 * weight gradients' sums; skipping alone changes nothing.
 *
 * Mode (STREAMCNN_SPARSE_BACKWARD): unset, "1": skip and boxes; "skip":
 * skip only; "0": off (every tile whole, as before).
 *
 * Owns: r->box_plan (released by _sc_run_release), the tile counters
 * (sc_backward_tiles). Calls: run.c, backward.c (_sc_backward_tile),
 * aten.c (_sc_nonzero_map). Called by replay.c.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Boxes tried per tile at most (the clustering is quadratic in them). */
#define BOX_MAX 64

/* ---- counters ------------------------------------------------------------ */

/* Process-wide, as sc_macs: whole, boxed and skipped backward tiles, and
 * the boxes the boxed ones ran. */
static _Atomic double g_tiles[4];

void sc_backward_tiles(double out[4], int reset) {
  _sc_counters_read(g_tiles, 4, out, reset);
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

/* Cached plans: a non-zero gradient is pending for the current tile (from
 * the row below, over its own columns, or from the tile on its right). */
static int pending(sc_run *r, int *any) {
  *any = 0;
  for (int64_t v = 1; v < r->nv && !*any; v++) {
    const int64_t *oc = own(r, 1, v);
    AtenTensorHandle t = NULL;
    int64_t dim, *sz, *st;
    if (r->gleft[v] && nonzeros(r, r->gleft[v], any, NULL, NULL, NULL))
      return SC_ERR;
    if (*any || !r->gband[v] || empty(oc)) continue;
    if (_sc_meta(r->ctx, r->gband[v], &dim, &sz, &st) ||
        _sc_view(r->ctx, r->gband[v], 0, sz[2], oc[0], oc[1] - oc[0], &t))
      return SC_ERR;
    const int rc = nonzeros(r, t, any, NULL, NULL, NULL);
    _sc_drop(&t);
    if (rc) return SC_ERR;
  }
  return SC_OK;
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

/* Elements the current plans' cone computes (own spans: what a cached
 * tile computes itself; cone plans: their regions). */
static double plans_size(const sc_run *r) {
  double total = 0.0;
  for (int64_t v = 0; v < r->nv; v++) {
    const int64_t *a = own(r, 0, v), *b = own(r, 1, v);
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

/* ---- the tile ------------------------------------------------------------ */

int _sc_sparse_tile(sc_run *r, AtenTensorHandle grad_out, int mode,
                    int *how) {
  const int64_t ov = r->p->n_instr;
  /* the output gradient this tile back-propagates: its own span's */
  const int64_t *rs = own(r, 0, ov), *cs = own(r, 1, ov);
  AtenTensorHandle g = NULL;
  unsigned char *map = NULL;
  box b[BOX_MAX];
  int any = 0, rc = SC_OK;
  int64_t h = 0, w = 0, n = 0;
  *how = SC_TILE_WHOLE;
  if (mode == SC_SPARSE_OFF || empty(rs) || empty(cs)) goto counted;
  if (r->cached && pending(r, &any)) return SC_ERR;
  if (any) goto counted; /* the halo's gradient needs the cached tile */
  if (_sc_view(r->ctx, grad_out, rs[0] - r->out_row0, /* a band's rows */
               rs[1] - rs[0], cs[0], cs[1] - cs[0], &g))
    return SC_ERR;
  rc = nonzeros(r, g, &any, mode == SC_SPARSE_BOXES ? &map : NULL, &h, &w);
  _sc_drop(&g);
  if (rc) return SC_ERR;
  if (!any) {
    *how = SC_TILE_SKIPPED;
    goto counted;
  }
  if (mode != SC_SPARSE_BOXES) goto counted;
  n = cluster(r->p, map, h, w, rs[0], cs[0], b);
  free(map);
  if (n < 0) return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  if (!r->box_plan[0] && !(r->box_plan[0] = sc_axis_plan_new(r->p)))
    return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  if (!r->box_plan[1] && !(r->box_plan[1] = sc_axis_plan_new(r->p)))
    return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  const sc_axis_plan *tile_plans[2] = {r->cur[0], r->cur[1]};
  const double whole = plans_size(r);
  double boxes = 0.0;
  for (int64_t k = 0; k < n; k++) {
    if (select_box(r, &b[k])) {
      rc = SC_ERR;
      break;
    }
    boxes += plans_size(r);
  }
  r->cur[0] = tile_plans[0];
  r->cur[1] = tile_plans[1];
  if (rc) return SC_ERR;
  if (boxes >= whole) goto counted;
  *how = SC_TILE_BOXED;
  /* each box as a tile of its own: cone plans, no halo, nothing pending */
  const int cached = r->cached;
  r->cached = 0;
  for (int64_t k = 0; !rc && k < n; k++) {
    rc = select_box(r, &b[k]) || _sc_backward_tile(r, grad_out);
    _sc_run_tile_release(r);
  }
  r->cached = cached;
  r->cur[0] = tile_plans[0];
  r->cur[1] = tile_plans[1];
  if (rc) return SC_ERR;
  count(3, (double)n);
counted:
  if (*how != SC_TILE_WHOLE && r->cached) /* nothing passes on */
    _sc_drop_all(r->gleft, r->nv);
  count(*how, 1.0);
  return SC_OK;
}
