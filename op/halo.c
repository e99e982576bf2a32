/*
 * halo.c — halo caching (call->cached; cached plans on both axes): each
 * tile computes only its own part of every value and takes the rest of
 * its region (its halo) from the tiles before it, row by row, left to
 * right: the band above it (full width, written by the row above) and the
 * strip left of it (written by the tile on the left). The forward keeps
 * them all in one flat store when asked (the strips); the backward runs
 * the tiles in reverse order, recomputes each tile's own part from its
 * halo, back-propagates its own output and hands the gradient its layers
 * send into the halo to the tiles above and to the left (_sc_pass_pending),
 * which add it before their own backward. Every value is computed once in
 * each pass.
 *
 * Owns: the strips' layout (_sc_plan_strips, band / left-strip views),
 * halo buffers, completing a value with its halo (_sc_add_halo), saving
 * the next tiles' halos (_sc_save_halo) and the pending halo gradients.
 * Calls: run.c. Called by forward.c (the forward of a tile), backward.c
 * (pending gradients) and replay.c (planning, the backward's views).
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdlib.h>

/* The part of value v that tile k along axis takes from the tiles before
 * it (its halo): rows of its band (axis 0), columns of its left strip
 * (axis 1). */
static void halo_span(const sc_run *r, int axis, int64_t k, int64_t v,
                      int64_t out[2]) {
  const sc_axis_plan *pl = r->plans[axis][k];
  out[0] = pl->region[2 * v];
  out[1] = pl->own[2 * v];
  if (out[1] < out[0] || pl->region[2 * v + 1] <= pl->region[2 * v])
    out[1] = out[0];
}

/* Columns of value v any tile computes: [0, band_width). */
static int64_t band_width(const sc_run *r, int64_t v) {
  return r->plans[1][r->n_tiles[1] - 1]->own[2 * v + 1];
}

/* *total += batch * channels * rows * cols, checked: a strips store past
 * int64 elements (absurd channels x extents) is refused, not wrapped. */
static int add_strip(sc_run *r, int64_t channels, int64_t rows, int64_t cols) {
  int64_t n;
  if (__builtin_mul_overflow(r->batch, channels, &n) ||
      __builtin_mul_overflow(n, rows, &n) ||
      __builtin_mul_overflow(n, cols, &n) ||
      __builtin_add_overflow(r->strip_total, n, &r->strip_total))
    return sc_fail(&r->ctx->err,
                   "streamcnn: the halo strips of this call would exceed "
                   "2^63 elements (batch %lld); use larger tiles or "
                   "halo_cache=False",
                   (long long)r->batch);
  return SC_OK;
}

/* Offsets of every halo in the flat strips store: the bands of row tiles
 * 1.., full width, then the left strips of column tiles 1.. of every row;
 * per value (the image has none: it is always at hand). */
int _sc_plan_strips(sc_run *r) {
  const int64_t nr = r->n_tiles[0], nc = r->n_tiles[1], nv = r->nv;
  r->strip_total = 0;
  r->band_off = malloc((size_t)(nr * nv) * sizeof *r->band_off);
  r->lstrip_off = malloc((size_t)(nr * nc * nv) * sizeof *r->lstrip_off);
  if (!r->band_off || !r->lstrip_off)
    return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  for (int64_t t = 0; t < nr; t++)
    for (int64_t v = 0; v < nv; v++) {
      int64_t rows[2];
      const int64_t w = band_width(r, v);
      int64_t *off = &r->band_off[t * nv + v];
      halo_span(r, 0, t, v, rows);
      *off = -1;
      if (t == 0 || v == 0 || empty(rows) || w <= 0) continue;
      *off = r->strip_total;
      if (add_strip(r, r->p->channels[v], rows[1] - rows[0], w)) return SC_ERR;
    }
  for (int64_t t = 0; t < nr; t++)
    for (int64_t c = 0; c < nc; c++)
      for (int64_t v = 0; v < nv; v++) {
        int64_t cols[2];
        const int64_t *rows = &r->plans[0][t]->own[2 * v];
        int64_t *off = &r->lstrip_off[(t * nc + c) * nv + v];
        halo_span(r, 1, c, v, cols);
        *off = -1;
        if (c == 0 || v == 0 || empty(cols) || empty(rows)) continue;
        *off = r->strip_total;
        if (add_strip(r, r->p->channels[v], rows[1] - rows[0],
                      cols[1] - cols[0]))
          return SC_ERR;
      }
  return SC_OK;
}

/* Cached plans: value o's tile region reaches beyond the span the tile
 * computes (its halo comes from the tiles before). */
int _sc_has_halo(const sc_run *r, int64_t o) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  return r->cached && !(same(rr, own(r, 0, o)) && same(rc, own(r, 1, o))) &&
         !empty(rr) && !empty(rc);
}

/* Rows and columns of value o's region above and left of its own span. */
static void halo_offsets(const sc_run *r, int64_t o, int64_t *top,
                         int64_t *lft) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *oc = own(r, 1, o);
  *top = (empty(orr) ? rr[1] : orr[0]) - rr[0];
  *lft = (empty(oc) ? rc[1] : oc[0]) - rc[0];
}

/* A new buffer over value o's region (*buf) and a view of its own span in
 * it (*own_part), for an instruction to write into. */
int _sc_halo_buffer(sc_run *r, int64_t o, AtenTensorHandle *buf,
                    AtenTensorHandle *own_part) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *oc = own(r, 1, o);
  const int64_t shape[4] = {r->batch, r->p->channels[o], rr[1] - rr[0],
                            rc[1] - rc[0]};
  int64_t top, lft;
  halo_offsets(r, o, &top, &lft);
  if (_sc_tile_buffer(r->ctx, shape, 0, buf) ||
      _sc_view(r->ctx, *buf, top, orr[1] - orr[0], lft, oc[1] - oc[0],
               own_part)) {
    _sc_drop(buf);
    return SC_ERR;
  }
  return SC_OK;
}

/* Views of the flat strips store: row tile t's band of value v (N x C x
 * halo rows x band width) and tile (t, c)'s left strip (N x C x own rows x
 * halo cols), contiguous. */
int _sc_band_view(sc_run *r, int64_t t, int64_t v, AtenTensorHandle *out) {
  int64_t rows[2];
  halo_span(r, 0, t, v, rows);
  const int64_t shape[4] = {r->batch, r->p->channels[v], rows[1] - rows[0],
                            band_width(r, v)};
  return _sc_flat_view(r->ctx, r->strips, r->band_off[t * r->nv + v], shape,
                       out);
}

int _sc_lstrip_view(sc_run *r, int64_t t, int64_t c, int64_t v,
                    AtenTensorHandle *out) {
  int64_t cols[2];
  const int64_t *rows = &r->plans[0][t]->own[2 * v];
  halo_span(r, 1, c, v, cols);
  const int64_t shape[4] = {r->batch, r->p->channels[v], rows[1] - rows[0],
                            cols[1] - cols[0]};
  return _sc_flat_view(r->ctx, r->strips,
                       r->lstrip_off[(t * r->n_tiles[1] + c) * r->nv + v],
                       shape, out);
}

/* dst[rows, cols of dst's own coordinates] (+)= src, through a view. */
static int copy_into(sc_run *r, AtenTensorHandle dst, int64_t r0, int64_t nr,
                     int64_t c0, int64_t ncol, AtenTensorHandle src,
                     int accumulate) {
  AtenTensorHandle d = NULL;
  int rc = _sc_view(r->ctx, dst, r0, nr, c0, ncol, &d) ||
           _sc_copy(r->ctx, d, src, accumulate);
  _sc_drop(&d);
  return rc;
}

/* Cached plans: val[o] holds value o over its own span (or nothing, when
 * that is empty), or already over its region with the own span written
 * (_sc_halo_buffer); make it the region: the top band from r->band[o], the
 * left strip from r->lhalo[o], the own span below right of them. */
int _sc_add_halo(sc_run *r, int64_t o) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  AtenTensorHandle buf = NULL, src = NULL;
  if (!_sc_has_halo(r, o)) return SC_OK;
  int64_t top, lft, dim, *sz, *st;
  halo_offsets(r, o, &top, &lft);
  const int64_t h = rr[1] - rr[0], w = rc[1] - rc[0];
  if ((top > 0 && !r->band[o]) || (lft > 0 && top < h && !r->lhalo[o]))
    return sc_fail(&r->ctx->err,
                   "streamcnn: internal error: no halo for value %lld",
                   (long long)o);
  const int64_t shape[4] = {r->batch, r->p->channels[o], h, w};
  if (r->val[o] && _sc_meta(r->ctx, r->val[o], &dim, &sz, &st)) return SC_ERR;
  const int placed = r->val[o] && sz[2] == h && sz[3] == w;
  int rc_ = SC_OK;
  if (placed) {
    buf = r->val[o];
    r->val[o] = NULL;
  } else {
    rc_ = _sc_tile_buffer(r->ctx, shape, 0, &buf);
  }
  if (!rc_ && top > 0) /* the band over this tile's columns */
    rc_ = _sc_view(r->ctx, r->band[o], 0, top, rc[0], w, &src) ||
          copy_into(r, buf, 0, top, 0, w, src, 0);
  _sc_drop(&src);
  if (!rc_ && lft > 0 && top < h)
    rc_ = copy_into(r, buf, top, h - top, 0, lft, r->lhalo[o], 0);
  if (!rc_ && !placed && top < h && lft < w)
    rc_ = copy_into(r, buf, top, h - top, lft, w - lft, r->val[o], 0);
  if (rc_) {
    _sc_drop(&buf);
    return SC_ERR;
  }
  _sc_drop(&r->val[o]);
  r->val[o] = buf;
  return SC_OK;
}

/* Forward sweep: keep what the next row (its band, over this tile's own
 * columns) and the next tile (its left strip) take from value o. */
int _sc_save_halo(sc_run *r, int64_t o) {
  int64_t hr[2], hc[2];
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *oc = own(r, 1, o);
  AtenTensorHandle src = NULL;
  int rc_ = SC_OK;
  if (!r->sweep || o == 0 || empty(rr) || empty(rc)) return SC_OK;
  if (r->row + 1 < r->n_tiles[0]) {
    halo_span(r, 0, r->row + 1, o, hr);
    if (!empty(hr) && !empty(oc)) {
      if (!r->band_next[o]) {
        const int64_t shape[4] = {r->batch, r->p->channels[o], hr[1] - hr[0],
                                  band_width(r, o)};
        rc_ = r->strips ? _sc_band_view(r, r->row + 1, o, &r->band_next[o])
                        : _sc_tile_buffer(r->ctx, shape, 0, &r->band_next[o]);
      }
      rc_ = rc_ || _sc_subview(r, r->val[o], rr, rc, hr, oc, &src) ||
            copy_into(r, r->band_next[o], 0, hr[1] - hr[0], oc[0],
                      oc[1] - oc[0], src, 0);
      _sc_drop(&src);
    }
  }
  if (!rc_ && r->col + 1 < r->n_tiles[1]) {
    halo_span(r, 1, r->col + 1, o, hc);
    if (!empty(hc) && !empty(orr)) {
      const int64_t shape[4] = {r->batch, r->p->channels[o], orr[1] - orr[0],
                                hc[1] - hc[0]};
      rc_ = _sc_subview(r, r->val[o], rr, rc, orr, hc, &src) ||
            (r->strips ? _sc_lstrip_view(r, r->row, r->col + 1, o, &r->lnext[o])
                       : _sc_tile_buffer(r->ctx, shape, 0, &r->lnext[o])) ||
            _sc_copy(r->ctx, r->lnext[o], src, 0);
      _sc_drop(&src);
    }
  }
  return rc_;
}

/* a ∩ b (empty: out[1] = out[0]) */
static void meet(const int64_t *a, const int64_t *b, int64_t out[2]) {
  out[0] = a[0] > b[0] ? a[0] : b[0];
  out[1] = a[1] < b[1] ? a[1] : b[1];
  if (out[1] < out[0]) out[1] = out[0];
}

/* The tile's own span of value v along axis in its full (cached) plans:
 * the current plans may be restricted ones (_sc_plan_restrict). */
static const int64_t *full_own(const sc_run *r, int axis, int64_t v) {
  return &r->plans[axis][axis ? r->col : r->row]->own[2 * v];
}

/* Cached backward: the current tile's halos, views of the strips (the
 * band and the left strip of every value) narrowed to what the current
 * plans' regions hold of them (all of them, unless restricted). */
int _sc_halo_views(sc_run *r) {
  const int64_t t = r->row, c = r->col, nc = r->n_tiles[1];
  AtenTensorHandle full = NULL;
  for (int64_t v = 1; v < r->nv; v++) {
    if (value_empty(r, v)) continue;
    const int64_t *rr = region(r, 0, v), *rc = region(r, 1, v);
    const int64_t *orr = own(r, 0, v);
    int64_t top, lft, hs[2];
    halo_offsets(r, v, &top, &lft);
    if (top > 0 && r->band_off[t * r->nv + v] >= 0) {
      const int64_t rows[2] = {rr[0], rr[0] + top};
      const int64_t cols[2] = {0, band_width(r, v)};
      halo_span(r, 0, t, v, hs);
      const int rc_ = _sc_band_view(r, t, v, &full) ||
                      _sc_subview(r, full, hs, cols, rows, cols, &r->band[v]);
      _sc_drop(&full);
      if (rc_) return SC_ERR;
    }
    if (lft > 0 && top < rr[1] - rr[0] &&
        r->lstrip_off[(t * nc + c) * r->nv + v] >= 0) {
      const int64_t cols[2] = {rc[0], rc[0] + lft};
      halo_span(r, 1, c, v, hs);
      const int rc_ =
          _sc_lstrip_view(r, t, c, v, &full) ||
          _sc_subview(r, full, full_own(r, 0, v), hs, orr, cols, &r->lhalo[v]);
      _sc_drop(&full);
      if (rc_) return SC_ERR;
    }
  }
  return SC_OK;
}

/* See internal.h. */
void _sc_pending_span(const sc_run *r, int64_t v, int left, int64_t rows[2],
                      int64_t cols[2]) {
  const int64_t *o = full_own(r, left ? 0 : 1, v);
  int64_t *own_side = left ? rows : cols;
  own_side[0] = o[0];
  own_side[1] = o[1];
  if (left)
    halo_span(r, 1, r->col + 1, v, cols);
  else
    halo_span(r, 0, r->row + 1, v, rows);
}

/* Cached plans, once every consumer of value o ran its backward: add the
 * gradients the tiles after this one left for o's positions here (the row
 * below: its bands' gradient over this tile's own columns; the tile on the
 * right: its left strip's), then pass on the part of o's gradient in this
 * tile's halo: the top band's to the row above (summed over the row, full
 * width), the left strip's to the tile on the left. Restricted plans
 * (sparse.c) hold only a part of each: the pending gradients are non-zero
 * only there, and what they pass on is that part, the rest zeros. */
int _sc_pass_pending(sc_run *r, int64_t o) {
  int64_t cl[2][2], span[2];
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *forr = full_own(r, 0, o);
  AtenTensorHandle src = NULL;
  int rc_ = SC_OK;
  for (int left = 0; left < 2; left++) {
    AtenTensorHandle *g = left ? &r->gleft[o] : &r->gband[o];
    int64_t ps[2][2], gcols[2];
    if (!*g) continue;
    _sc_pending_span(r, o, left, ps[0], ps[1]);
    meet(ps[0], rr, cl[0]);
    meet(ps[1], rc, cl[1]);
    gcols[0] = left ? ps[1][0] : 0; /* a band is full width */
    gcols[1] = left ? ps[1][1] : band_width(r, o);
    if (!empty(cl[0]) && !empty(cl[1]))
      rc_ = _sc_subview(r, *g, ps[0], gcols, cl[0], cl[1], &src) ||
            _sc_add_grad(r, o, cl, src, 0);
    _sc_drop(&src);
    if (left) _sc_drop(g); /* the band serves the whole row */
    if (rc_) return SC_ERR;
  }
  if (!r->grad[o]) return SC_OK;
  if (r->row > 0) {
    int64_t hr[2];
    halo_span(r, 0, r->row, o, span);
    meet(span, rr, hr);
    if (!empty(hr)) {
      if (!r->gband_up[o]) {
        const int64_t shape[4] = {r->batch, r->p->channels[o],
                                  span[1] - span[0], band_width(r, o)};
        if (_sc_tile_buffer(r->ctx, shape, 1, &r->gband_up[o])) return SC_ERR;
      }
      rc_ = _sc_subview(r, r->grad[o], rr, rc, hr, rc, &src) ||
            copy_into(r, r->gband_up[o], hr[0] - span[0], hr[1] - hr[0], rc[0],
                      rc[1] - rc[0], src, 1);
      _sc_drop(&src);
      if (rc_) return SC_ERR;
    }
  }
  if (r->col > 0 && !empty(orr)) {
    int64_t hc[2];
    halo_span(r, 1, r->col, o, span);
    meet(span, rc, hc);
    if (!empty(hc)) {
      /* the left neighbour reads it over its own rows and our halo's
       * columns: zeros where the restricted region holds none */
      const int part = !same(orr, forr) || !same(hc, span);
      const int64_t shape[4] = {r->batch, r->p->channels[o],
                                forr[1] - forr[0], span[1] - span[0]};
      rc_ = _sc_subview(r, r->grad[o], rr, rc, orr, hc, &src) ||
            _sc_tile_buffer(r->ctx, shape, part, &r->gleft[o]) ||
            copy_into(r, r->gleft[o], orr[0] - forr[0], orr[1] - orr[0],
                      hc[0] - span[0], hc[1] - hc[0], src, 0);
      _sc_drop(&src);
    }
  }
  return rc_;
}
