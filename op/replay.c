/*
 * replay.c — run the program tile by tile, forward and backward.
 *
 * Forward: the stem output is partitioned into tiles; for each tile the
 * geometry (geometry.c) gives the span of every value the tile depends on,
 * and the program runs on those spans only. Window layers run with padding
 * 0 on an input that is explicitly padded where (and only where) it crosses
 * the true border of its value, so every tile computes exactly the values
 * of the whole-image pass.
 *
 * Backward: by linearity the gradient of the loss is the sum over output
 * tiles of each tile's output gradient pushed back through its own cone.
 * Each tile recomputes its cone's forward (keeping what the backward ops
 * need), back-propagates through ATen's backward ops, sums weight
 * gradients over tiles and scatter-adds input gradients into the image.
 *
 * Halo caching (call->cached; cached plans on both axes): each tile
 * computes only its own part of every value and takes the rest of its
 * region (its halo) from the tiles before it, row by row, left to right:
 * the band above it (full width, written by the row above) and the strip
 * left of it (written by the tile on the left). The forward keeps them all
 * in one flat store when asked (the strips); the backward then runs the
 * tiles in reverse order, recomputes each tile's own part from its halo,
 * back-propagates its own output and hands the gradient its layers send
 * into the halo to the tiles above and to the left (pass_pending), which
 * add it before their own backward. Every value is computed once in each
 * pass.
 *
 * Ownership: a `run` owns every handle stored in it; run_tile_release and
 * run_release free them. Borrowed inputs (image, params, grad_output) are
 * only read, never written.
 */
#define STREAMCNN_TORCH
#include "internal.h"
#include "half.h"

#include "tile.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

typedef struct run {
  sc_ctx *ctx;
  const sc_call *call;
  const sc_program *p;
  int64_t nv;           /* values: n_instr + 1 */
  int64_t batch;
  int64_t *sizes;       /* 2 * nv: extent of every value (rows, cols) */
  int64_t tile_out[2];  /* output tile edge (rows, cols) */
  int64_t n_tiles[2];
  sc_axis_plan **plans[2]; /* per axis, one plan per tile index */
  int64_t n_order;          /* n_tiles[0] * n_tiles[1] */
  int64_t *order;           /* tiles as row * n_tiles[1] + col, largest first */

  /* per-tile state */
  const sc_axis_plan *cur[2]; /* plans in use: the tile's, or a piece's */
  int64_t keep_from;        /* values below this are not kept (recomputed) */
  AtenTensorHandle *val;    /* nv: forward value over its region */
  AtenTensorHandle *grad;   /* nv: gradient over the value's region */
  unsigned char *grad_mine; /* nv: grad[v] may be written in place */
  AtenTensorHandle *aux;    /* n_instr: avg-pool divisor map, from the
                               recompute, for the backward */
  int64_t *left;            /* nv: consumers still to run in the forward */
  unsigned char *keep;      /* nv: a backward op reads this value */

  /* backward */
  int64_t cut;              /* 0, or the value the backward splits at */
  int64_t pieces;           /* row pieces for the part below the cut */
  const int *mask;          /* 1 + n_params */
  unsigned char *needs;     /* nv: value needs a gradient */
  AtenTensorHandle *pgrad;  /* n_params: gradient sums */

  /* batch norms folded into the convolution before them (_sc_fusion) */
  int64_t *fused;           /* n_instr: the partner instruction, or -1 */
  AtenTensorHandle *fold;   /* 4 per fused convolution: _sc_fold_bn's */
  AtenTensorHandle *fsum;   /* 2 per fused convolution: its weight gradient
                               against the folded weight and its output
                               gradient's per-channel sum, summed over the
                               tiles (converted once, fold_grads_finish) */
  AtenTensorHandle igrad;   /* image gradient, when mask[0] */

  /* halo caching: plans on both axes are cached plans, each value computed
   * once. Tiles run row by row, left to right in the forward and in the
   * reverse order in the backward. A tile's region beyond its own span is
   * its halo: the top band (rows above its own, all its region's columns,
   * computed by the rows of tiles above) and the left strip (its own rows,
   * columns left of its own, computed by the tile on the left). */
  int cached;
  int64_t row, col;          /* the tile in use */
  AtenTensorHandle strips;   /* flat store of all halos (borrowed), or NULL */
  int64_t *band_off;         /* row * nv + v: element offset in strips of
                                row tile `row`'s band (full width), -1 none */
  int64_t *lstrip_off;       /* (row * n_tiles[1] + col) * nv + v: of tile
                                (row, col)'s left strip, -1 none */
  int64_t strip_total;       /* elements of strips */
  AtenTensorHandle *band;    /* nv: this row's bands (full width) */
  AtenTensorHandle *band_next; /* nv: the next row's (forward sweep) */
  AtenTensorHandle *lhalo;   /* nv: this tile's left strips */
  AtenTensorHandle *lnext;   /* nv: the next tile's (forward sweep) */
  int sweep;                 /* forward_tile fills band_next / lnext */
  AtenTensorHandle *gband;   /* nv: gradient of the next row's bands,
                                pending for this row (backward) */
  AtenTensorHandle *gband_up; /* nv: gradient of this row's bands */
  AtenTensorHandle *gleft;   /* nv: gradient of the right neighbour's left
                                strips, pending for this tile; then this
                                tile's, for the left neighbour */

  int nhwc_image;             /* tiles_nhwc, and more than convolutions read
                                the image: its tile is copied channels-last */

  /* a pinned host image: the next tile's pixels are copied to the device
   * on a side stream while this tile computes */
  int64_t next_tile[2];      /* row, col of the tile after this one; -1 none */
  int img_pinned;            /* host image, pinned */
  int pf_open;
  sc_prefetch pf;
  AtenTensorHandle pf_buf;   /* the copy (owned), or NULL */
  int64_t pf_span[2][2];     /* its rows and cols of the image */
  int host_direct;           /* this tile's pixels are read from pinned memory */
  void *host_ev;             /* cudaEvent_t after the last such read, or NULL */
} run;

/* ---- spans ------------------------------------------------------------------ */

static const int64_t *region(const run *r, int axis, int64_t v) {
  return &r->cur[axis]->region[2 * v];
}

static const int64_t *readspan(const run *r, int axis, int64_t i, int slot) {
  return &r->cur[axis]->read[4 * i + 2 * slot];
}

/* The span of value v the tile computes (region minus the halo). */
static const int64_t *own(const run *r, int axis, int64_t v) {
  return &r->cur[axis]->own[2 * v];
}

static int empty(const int64_t *s) { return s[1] <= s[0]; }

/* Bytes per element of an image or parameter dtype (uint8, float16,
 * bfloat16, float32, float64; 0 for others). */
static int dtype_size(int32_t d) {
  if (d == aoti_torch_dtype_uint8()) return 1;
  if (d == aoti_torch_dtype_float16() || d == aoti_torch_dtype_bfloat16())
    return 2;
  if (d == aoti_torch_dtype_float32()) return 4;
  if (d == aoti_torch_dtype_float64()) return 8;
  return 0;
}

static int same(const int64_t *a, const int64_t *b) {
  return a[0] == b[0] && a[1] == b[1];
}

static int value_empty(const run *r, int64_t v) {
  return empty(region(r, 0, v)) || empty(region(r, 1, v));
}

/* [lo, hi) clipped to [0, n) */
static void clip(const int64_t *s, int64_t n, int64_t out[2]) {
  out[0] = s[0] < 0 ? 0 : s[0];
  out[1] = s[1] > n ? n : s[1];
  if (out[1] < out[0]) out[1] = out[0];
}

/* New reference to `t` restricted to the absolute spans (rows, cols), given
 * that t covers the absolute spans (trow, tcol). */
static int subview(run *r, AtenTensorHandle t, const int64_t *trow,
                   const int64_t *tcol, const int64_t *row,
                   const int64_t *col, AtenTensorHandle *out) {
  if (row[0] == trow[0] && row[1] == trow[1] && col[0] == tcol[0] &&
      col[1] == tcol[1]) {
    if (aoti_torch_new_tensor_handle(t, out))
      return sc_fail(&r->ctx->err, "streamcnn: cannot reference a tensor");
    return SC_OK;
  }
  return _sc_view(r->ctx, t, row[0] - trow[0], row[1] - row[0],
                  col[0] - tcol[0], col[1] - col[0], out);
}

/* ---- per-call setup ----------------------------------------------------------- */

/* Elements the tile's cone holds (sum over values of region area x
 * channels): a proxy for its buffer sizes (double: no overflow). */
static double cone_size(const run *r, int64_t t) {
  double total = 0.0;
  const sc_axis_plan *pr = r->plans[0][t / r->n_tiles[1]];
  const sc_axis_plan *pc = r->plans[1][t % r->n_tiles[1]];
  for (int64_t v = 0; v < r->nv; v++) {
    const int64_t h = pr->region[2 * v + 1] - pr->region[2 * v];
    const int64_t w = pc->region[2 * v + 1] - pc->region[2 * v];
    if (h > 0 && w > 0) total += (double)h * (double)w * (double)r->p->channels[v];
  }
  return total;
}

typedef struct tile_key {
  double size;   /* cone_size of the tile */
  int64_t index; /* row * n_tiles[1] + col */
} tile_key;

static int by_size_desc(const void *a, const void *b) {
  const tile_key *x = a, *y = b;
  if (x->size != y->size) return x->size < y->size ? 1 : -1;
  return x->index < y->index ? -1 : x->index > y->index; /* deterministic */
}

/* Run the largest tiles first: on the CPU the smaller border tiles then fit
 * in the heap blocks the large ones freed, instead of growing the heap
 * (glibc keeps such blocks; see release_free_pages). Order is irrelevant to
 * the result beyond the summation order of weight gradients. */
static int order_tiles(run *r) {
  r->order = malloc((size_t)r->n_order * sizeof *r->order);
  tile_key *keys = malloc((size_t)r->n_order * sizeof *keys);
  if (!r->order || !keys) {
    free(keys);
    return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  }
  for (int64_t t = 0; t < r->n_order; t++) {
    keys[t].size = cone_size(r, t);
    keys[t].index = t;
  }
  qsort(keys, (size_t)r->n_order, sizeof *keys, by_size_desc);
  for (int64_t t = 0; t < r->n_order; t++) r->order[t] = keys[t].index;
  free(keys);
  return SC_OK;
}

static void select_tile(run *r, int64_t k) {
  r->cur[0] = r->plans[0][r->order[k] / r->n_tiles[1]];
  r->cur[1] = r->plans[1][r->order[k] % r->n_tiles[1]];
}

/* Once per CPU call, before the first tile: hand the pages of free heap
 * blocks back to the OS. Tile buffers are mostly below glibc's dynamic
 * (up to 32 MB) mmap threshold, so they live on the heap, and what the
 * previous call (e.g. the forward op before the backward op) freed sits
 * there as fragmented holes that still count as resident. Trimming after
 * every tile instead would re-fault every buffer of the next tile. GPU
 * memory is the caching allocator's business and is left alone. */
static void release_free_pages(const sc_ctx *ctx) {
#if defined(__GLIBC__)
  if (!ctx->is_cuda) malloc_trim(0);
#else
  (void)ctx;
#endif
}

static void run_tile_release(run *r) {
  for (int64_t v = 0; v < r->nv; v++) {
    _sc_drop(&r->val[v]);
    _sc_drop(&r->grad[v]);
    r->grad_mine[v] = 0;
  }
  for (int64_t i = 0; i < r->p->n_instr; i++) _sc_drop(&r->aux[i]);
}

/* The per-value handle arrays of halo caching (run_init allocates them,
 * run_release frees them). */
#define HALO_ARRAYS(r)                                                        \
  {&(r)->band, &(r)->band_next, &(r)->lhalo, &(r)->lnext, &(r)->gband,       \
   &(r)->gband_up, &(r)->gleft}

static void drop_all(AtenTensorHandle *h, int64_t n) {
  if (h)
    for (int64_t v = 0; v < n; v++) _sc_drop(&h[v]);
}

/* dst[v] = src[v] (moved; dst's old handles released). */
static void move_all(AtenTensorHandle *dst, AtenTensorHandle *src, int64_t n) {
  for (int64_t v = 0; v < n; v++) {
    _sc_drop(&dst[v]);
    dst[v] = src[v];
    src[v] = NULL;
  }
}

static void run_release(run *r) {
#ifdef SC_WITH_CUDA
  if (r->pf_open) sc_prefetch_close(&r->pf); /* waits for its copies */
  /* the caller may free the pinned image once the call returns */
  sc_host_reads_wait(&r->host_ev);
#endif
  _sc_drop(&r->pf_buf);
  if (r->val && r->grad && r->grad_mine && r->aux) run_tile_release(r);
  AtenTensorHandle **arrays[] = HALO_ARRAYS(r);
  for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++) {
    drop_all(*arrays[k], r->nv);
    free(*arrays[k]);
  }
  free(r->band_off);
  free(r->lstrip_off);
  for (int a = 0; a < 2; a++) {
    if (!r->plans[a]) continue;
    for (int64_t t = 0; t < r->n_tiles[a]; t++)
      sc_axis_plan_free(r->plans[a][t]);
    free(r->plans[a]);
  }
  if (r->pgrad)
    for (int64_t k = 0; k < r->p->n_params; k++) _sc_drop(&r->pgrad[k]);
  if (r->fold) drop_all(r->fold, 4 * r->p->n_instr);
  if (r->fsum) drop_all(r->fsum, 2 * r->p->n_instr);
  free(r->fused);
  free(r->fold);
  free(r->fsum);
  _sc_drop(&r->igrad);
  free(r->order);
  free(r->sizes);
  free(r->val);
  free(r->grad);
  free(r->grad_mine);
  free(r->aux);
  free(r->keep);
  free(r->left);
  free(r->needs);
  free(r->pgrad);
}

/* The part of value v that tile k along axis takes from the tiles before
 * it (its halo): rows of its band (axis 0), columns of its left strip
 * (axis 1). */
static void halo_span(const run *r, int axis, int64_t k, int64_t v,
                      int64_t out[2]) {
  const sc_axis_plan *pl = r->plans[axis][k];
  out[0] = pl->region[2 * v];
  out[1] = pl->own[2 * v];
  if (out[1] < out[0] || pl->region[2 * v + 1] <= pl->region[2 * v])
    out[1] = out[0];
}

/* Columns of value v any tile computes: [0, band_width). */
static int64_t band_width(const run *r, int64_t v) {
  return r->plans[1][r->n_tiles[1] - 1]->own[2 * v + 1];
}

/* Offsets of every halo in the flat strips store: the bands of row tiles
 * 1.., full width, then the left strips of column tiles 1.. of every row;
 * per value (the image has none: it is always at hand). */
static int plan_strips(run *r) {
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
      r->strip_total += r->batch * r->p->channels[v] * (rows[1] - rows[0]) * w;
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
        r->strip_total += r->batch * r->p->channels[v] * (rows[1] - rows[0]) *
                          (cols[1] - cols[0]);
      }
  return SC_OK;
}


/* The plans of the tiles along one axis, between _sc_tile_bounds's
 * bounds (the first of the plans serves as their scratch). */
static int plan_axis_tiles(run *r, int a, int64_t tile_in) {
  const sc_program *p = r->p;
  sc_error *err = &r->ctx->err;
  const int64_t n = r->sizes[2 * p->n_instr + a];
  r->n_tiles[a] = (n + r->tile_out[a] - 1) / r->tile_out[a];
  r->plans[a] = calloc((size_t)r->n_tiles[a], sizeof *r->plans[a]);
  int64_t *bounds = malloc((size_t)(r->n_tiles[a] + 1) * sizeof *bounds);
  int rc = !r->plans[a] || !bounds;
  for (int64_t t = 0; !rc && t < r->n_tiles[a]; t++)
    rc = !(r->plans[a][t] = sc_axis_plan_new(p));
  if (rc) {
    free(bounds);
    return sc_fail(err, "streamcnn: out of memory");
  }
  rc = _sc_tile_bounds(p, r->sizes, a, r->tile_out[a], tile_in, r->cached,
                       r->plans[a][0], bounds, err);
  for (int64_t t = 0; !rc && t < r->n_tiles[a]; t++)
    rc = r->cached ? sc_plan_axis_cached(p, r->sizes, a, bounds[t],
                                         bounds[t + 1], r->plans[a][t], err)
                   : sc_plan_axis(p, r->sizes, a, bounds[t], bounds[t + 1],
                                  r->plans[a][t], err);
  free(bounds);
  return rc;
}

static AtenTensorHandle param(const run *r, int64_t k);
static int image_affine_shape(const sc_program *p);
static int affine_image(const run *r);
static int affine_image_forward(run *r, AtenTensorHandle *y);

/* Whether an instruction other than a convolution reads the image. */
static int image_read_by_non_conv(const sc_program *p) {
  for (int64_t i = 0; i < p->n_instr; i++)
    for (int j = 0; j < p->instr[i].n_in; j++)
      if (p->instr[i].in[j] == 0 && p->instr[i].op != SC_OP_CONV) return 1;
  return 0;
}

static int run_init(run *r, sc_ctx *ctx, const sc_call *call) {
  const sc_program *p = call->prog;
  int64_t dim, *isz, *ist;
  memset(r, 0, sizeof *r);
  r->ctx = ctx;
  r->call = call;
  r->p = p;
  r->nv = p->n_instr + 1;
  if (_sc_meta(ctx, call->image, &dim, &isz, &ist)) return SC_ERR;
  r->batch = isz[0];
  r->sizes = calloc(2 * (size_t)r->nv, sizeof *r->sizes);
  r->val = calloc((size_t)r->nv, sizeof *r->val);
  r->grad = calloc((size_t)r->nv, sizeof *r->grad);
  r->grad_mine = calloc((size_t)r->nv, 1);
  r->keep = calloc((size_t)r->nv, 1);
  r->aux = calloc((size_t)p->n_instr, sizeof *r->aux);
  r->left = calloc((size_t)r->nv, sizeof *r->left);
  r->needs = calloc((size_t)r->nv, 1);
  r->pgrad = calloc((size_t)p->n_params + 1, sizeof *r->pgrad);
  r->fused = calloc((size_t)p->n_instr + 1, sizeof *r->fused);
  r->fold = calloc(4 * (size_t)p->n_instr + 1, sizeof *r->fold);
  r->fsum = calloc(2 * (size_t)p->n_instr + 1, sizeof *r->fsum);
  r->cached = call->cached;
  r->next_tile[0] = r->next_tile[1] = -1;
  AtenTensorHandle **arrays[] = HALO_ARRAYS(r);
  int have = 1;
  for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++)
    have &= (*arrays[k] = calloc((size_t)r->nv, sizeof **arrays[k])) != NULL;
  if (!r->sizes || !r->val || !r->grad || !r->grad_mine || !r->keep ||
      !r->aux || !r->left || !r->needs || !r->pgrad || !r->fused ||
      !r->fold || !r->fsum || !have)
    return sc_fail(&ctx->err, "streamcnn: out of memory");
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
  if (sc_value_sizes(p, isz[2], isz[3], r->sizes, &ctx->err) ||
      _sc_tiling(p, r->sizes, call->tile[0], call->tile[1], r->tile_out,
                 &ctx->err))
    return SC_ERR;
  for (int a = 0; a < 2; a++)
    if (plan_axis_tiles(r, a, call->tile[a])) return SC_ERR;
  if (r->cached && plan_strips(r)) return SC_ERR;
#ifdef SC_WITH_CUDA
  if (ctx->image_host) { /* prefetch_issue skips layouts no 2-D copy reads */
    void *ptr = NULL;
    r->img_pinned = !aoti_torch_get_data_ptr(call->image, &ptr) && ptr &&
                    sc_cuda_host_mapped(ptr);
  }
#endif
  r->nhwc_image = ctx->tiles_nhwc && image_read_by_non_conv(p);
  r->n_order = r->n_tiles[0] * r->n_tiles[1];
  return r->cached ? SC_OK : order_tiles(r); /* cached: a fixed sweep */
}

/* ---- forward of one tile ---------------------------------------------------- */

/* Per output row (or col) of a pool over an input of extent n: the divisor
 * factor ATen uses (count_include_pad: window clipped to n + pad; else
 * window clipped to [0, n)). Returns 1 when every factor equals k. */
static int avg_factors(const sc_window *w, int include_pad, int64_t n,
                       const int64_t *span, double *f) {
  int uniform = 1;
  for (int64_t o = span[0]; o < span[1]; o++) {
    const int64_t start = o * w->s - w->pad_lo;
    int64_t end = start + w->k;
    if (end > n + w->pad_hi) end = n + w->pad_hi;
    int64_t cnt;
    if (include_pad) {
      cnt = end - start;
    } else {
      const int64_t s0 = start < 0 ? 0 : start, e0 = end > n ? n : end;
      cnt = e0 - s0;
    }
    f[o - span[0]] = (double)cnt;
    if (cnt != w->k) uniform = 0;
  }
  return uniform;
}

/* Divisor map [1, 1, h, w] of ATen's average pooling for the output region
 * of instruction i, or NULL (*out) when the divisor is k_h * k_w throughout
 * (then avg_pool2d with zero explicit padding is already exact). */
static int avg_divisor(run *r, int64_t i, AtenTensorHandle *out) {
  const sc_instr *in = &r->p->instr[i];
  const int64_t o = i + 1;
  const int64_t *rs = own(r, 0, o), *cs = own(r, 1, o);
  const int64_t h = rs[1] - rs[0], w = cs[1] - cs[0];
  int rc = SC_ERR;
  *out = NULL;
  if (in->divisor_override) return SC_OK;
  double *fr = malloc((size_t)(h + w) * sizeof *fr);
  if (!fr) return sc_fail(&r->ctx->err, "streamcnn: out of memory");
  double *fc = fr + h;
  const int ur = avg_factors(&in->win[0], in->count_include_pad,
                             r->sizes[2 * in->in[0]], rs, fr);
  const int uc = avg_factors(&in->win[1], in->count_include_pad,
                             r->sizes[2 * in->in[0] + 1], cs, fc);
  if (ur && uc) {
    free(fr);
    return SC_OK;
  }
  const int64_t shape[4] = {1, 1, h, w}, strides[4] = {h * w, h * w, w, 1};
  AtenTensorHandle host = NULL;
  void *data;
  if (aoti_torch_empty_strided(4, shape, strides, r->ctx->dtype,
                               aoti_torch_device_type_cpu(), 0, &host) ||
      aoti_torch_get_data_ptr(host, &data)) {
    sc_fail(&r->ctx->err, "streamcnn: could not allocate a divisor map");
    goto done;
  }
  for (int64_t y = 0; y < h; y++)
    for (int64_t x = 0; x < w; x++) {
      const double d = fr[y] * fc[x]; /* exact: small integers */
      if (r->ctx->kdtype == SC_DTYPE_F32)
        ((float *)data)[y * w + x] = (float)d;
      else if (r->ctx->kdtype == SC_DTYPE_F64)
        ((double *)data)[y * w + x] = d;
      else if (r->ctx->kdtype == SC_DTYPE_F16) /* divisors <= 2048: exact */
        ((uint16_t *)data)[y * w + x] = sc_f32_to_f16((float)d);
      else /* bfloat16: divisors are small integers, 256 and below exact */
        ((uint16_t *)data)[y * w + x] = sc_f32_to_bf16((float)d);
    }
  if (!r->ctx->is_cuda) {
    *out = host;
    host = NULL;
  } else if (_sc_empty(r->ctx, 4, shape, out) ||
             _sc_copy_across(r->ctx, *out, host)) {
    _sc_drop(out);
    goto done;
  }
  rc = SC_OK;
done:
  _sc_drop(&host);
  free(fr);
  return rc;
}

/* Input of instruction i, slot j, over the span it reads: a view of the
 * input value where the span lies inside it, else a padded copy in the
 * value's layout (channels-last stays channels-last). With tiles_nhwc a
 * convolution of the image always gets a channels-last copy (cheap: few
 * channels), so the whole tile downstream runs channels-last. */
static int layer_input(run *r, int64_t i, int j, double pad_value,
                       AtenTensorHandle *out) {
  const sc_instr *in = &r->p->instr[i];
  const int64_t v = in->in[j];
  const int64_t *rd[2] = {readspan(r, 0, i, j), readspan(r, 1, i, j)};
  int64_t cl[2][2];
  int inside = 1, nonempty = 1;
  *out = NULL;
  for (int a = 0; a < 2; a++) {
    clip(rd[a], r->sizes[2 * v + a], cl[a]);
    if (cl[a][0] != rd[a][0] || cl[a][1] != rd[a][1]) inside = 0;
    if (empty(cl[a])) nonempty = 0;
  }
  AtenTensorHandle src = NULL;
  if (nonempty) {
    if (!r->val[v])
      return sc_fail(&r->ctx->err,
                     "streamcnn: internal error: value %lld not computed",
                     (long long)v);
    if (subview(r, r->val[v], region(r, 0, v), region(r, 1, v), cl[0], cl[1],
                &src))
      return SC_ERR;
  }
  const int to_nhwc = v == 0 && in->op == SC_OP_CONV && r->ctx->tiles_nhwc &&
                      !(src && _sc_is_channels_last(r->ctx, src));
  if (inside && !to_nhwc) {
    *out = src;
    return SC_OK;
  }
  const int nhwc = to_nhwc || (src && _sc_is_channels_last(r->ctx, src));
  int rc = _sc_gather(r->ctx, src, r->batch, r->p->channels[v],
                      rd[0][1] - rd[0][0], rd[1][1] - rd[1][0],
                      cl[0][0] - rd[0][0], cl[1][0] - rd[1][0], pad_value, nhwc,
                      out);
  _sc_drop(&src);
  return rc;
}

/* A buffer of the shape (and the tiles' layout) layer_input would give,
 * contents undefined: the input of a convolution whose weight takes no
 * gradient, read by convolution_backward for its shape only (the value
 * itself was not kept, see _sc_keep_set). */
static int layer_shape(run *r, int64_t i, int j, AtenTensorHandle *out) {
  const int64_t v = r->p->instr[i].in[j];
  const int64_t *rd[2] = {readspan(r, 0, i, j), readspan(r, 1, i, j)};
  const int64_t sz[4] = {r->batch, r->p->channels[v], rd[0][1] - rd[0][0],
                         rd[1][1] - rd[1][0]};
  return _sc_tile_buffer(r->ctx, sz, 0, out);
}

/* Input value of a pointwise instruction restricted to the span the
 * instruction computes. */
static int pointwise_input(run *r, int64_t i, int j, AtenTensorHandle *out) {
  const int64_t v = r->p->instr[i].in[j], o = i + 1;
  return subview(r, r->val[v], region(r, 0, v), region(r, 1, v), own(r, 0, o),
                 own(r, 1, o), out);
}

/* New reference to value v (or its gradient) restricted to its own span. */
static int own_view(run *r, AtenTensorHandle t, int64_t v,
                    AtenTensorHandle *out) {
  return subview(r, t, region(r, 0, v), region(r, 1, v), own(r, 0, v),
                 own(r, 1, v), out);
}

/* Is value v held for the backward (keep = 1: a recompute for backward)? */
static int kept(const run *r, int64_t v, int keep) {
  return keep && r->keep[v] && v >= r->keep_from;
}

/* May instruction i overwrite its input slot j in place? Only a value this
 * tile computed whole (not the caller's image, no halo from other tiles),
 * read by this instruction alone, over exactly the span the instruction
 * computes, and not needed by the backward. */
static int reusable(const run *r, int64_t i, int j, int keep) {
  const int64_t v = r->p->instr[i].in[j], o = i + 1;
  if (v == 0 || r->p->n_consumers[v] != 1 || kept(r, v, keep) || !r->val[v])
    return 0;
  for (int a = 0; a < 2; a++)
    if (!same(region(r, a, v), own(r, a, o)) ||
        !same(region(r, a, v), own(r, a, v)))
      return 0;
  return 1;
}

/* Cached plans: value o's tile region reaches beyond the span the tile
 * computes (its halo comes from the tiles before). */
static int has_halo(const run *r, int64_t o) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  return r->cached && !(same(rr, own(r, 0, o)) && same(rc, own(r, 1, o))) &&
         !empty(rr) && !empty(rc);
}

/* Rows and columns of value o's region above and left of its own span. */
static void halo_offsets(const run *r, int64_t o, int64_t *top,
                         int64_t *lft) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *oc = own(r, 1, o);
  *top = (empty(orr) ? rr[1] : orr[0]) - rr[0];
  *lft = (empty(oc) ? rc[1] : oc[0]) - rc[0];
}

/* A new buffer over value o's region (*buf) and a view of its own span in
 * it (*own_part), for an instruction to write into. */
static int halo_buffer(run *r, int64_t o, AtenTensorHandle *buf,
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

static AtenTensorHandle param(const run *r, int64_t k) {
  return k >= 0 ? r->call->params[k] : NULL;
}

/* Run instruction i on the current tile; keep: store what backward needs. */
static int forward_instr(run *r, int64_t i, int keep) {
  const sc_instr *in = &r->p->instr[i];
  sc_ctx *ctx = r->ctx;
  AtenTensorHandle x = NULL, y = NULL, aux = NULL, t = NULL;
  int rc = SC_ERR;
  switch (in->op) {
  case SC_OP_CONV: {
    const int f = r->fused[i] >= 0; /* with its batch norm folded in */
    if (i == 0 && affine_image(r)) {
      if (affine_image_forward(r, &y)) goto done;
      break;
    }
    if (i == 0 && r->ctx->affine_f32) {
      sc_fail(&ctx->err,
              "streamcnn: params[%lld] (weight of instruction 0, conv) is "
              "float32 in a %s computation: a float32 per-channel map of "
              "the image (mean / std) is applied only while its weight "
              "takes no gradient",
              (long long)in->weight,
              ctx->kdtype == SC_DTYPE_F16 ? "float16" : "bfloat16");
      goto done;
    }
    if (layer_input(r, i, 0, 0.0, &x) ||
        _sc_conv(ctx, x, f ? r->fold[4 * i] : param(r, in->weight),
                 f ? r->fold[4 * i + 1] : param(r, in->bias), in, &y))
      goto done;
    break;
  }
  case SC_OP_MAXPOOL:
    /* NB: max pooling pads with -inf, not 0. No indices: the backward
     * takes them again from the input it keeps anyway (int64 indices are
     * twice a float32 output, held from the recompute to the backward) */
    if (layer_input(r, i, 0, -INFINITY, &x) || _sc_maxpool(ctx, x, in, &y, NULL))
      goto done;
    break;
  case SC_OP_AVGPOOL:
    if (layer_input(r, i, 0, 0.0, &x) || avg_divisor(r, i, &aux)) goto done;
    if (!aux) {
      if (_sc_avgpool(ctx, x, in, in->divisor_override, &y)) goto done;
    } else { /* window sums over the zero-padded input / ATen's divisors */
      if (_sc_avgpool(ctx, x, in, 1, &y) || _sc_div_(ctx, y, aux)) goto done;
    }
    if (!keep) _sc_drop(&aux);
    break;
  case SC_OP_BATCHNORM: {
    AtenTensorHandle p4[4] = {param(r, in->bn_weight), param(r, in->bn_bias),
                              param(r, in->bn_mean), param(r, in->bn_var)};
    if (r->fused[i] >= 0) { /* the convolution applied it */
      if (pointwise_input(r, i, 0, &y)) goto done;
      break;
    }
    if (pointwise_input(r, i, 0, &x) ||
        _sc_batchnorm(ctx, x, p4, in->eps, &y))
      goto done;
    break;
  }
  case SC_OP_LAYERNORM_C:
    if (pointwise_input(r, i, 0, &x) ||
        _sc_layernorm_c(ctx, x, param(r, in->weight), param(r, in->bias),
                        in->eps, &y))
      goto done;
    break;
  case SC_OP_LINEAR_C:
    if (pointwise_input(r, i, 0, &x) ||
        _sc_linear_c(ctx, x, param(r, in->weight), param(r, in->bias), &y))
      goto done;
    break;
  case SC_OP_SCALE_C:
    if (pointwise_input(r, i, 0, &x) ||
        _sc_scale_c(ctx, x, param(r, in->weight), &y))
      goto done;
    break;
  case SC_OP_ACT:
    if (in->act == SC_ACT_RELU && has_halo(r, i + 1)) {
      /* straight into the region-sized buffer add_halo completes: no
       * in-place pass and copy */
      if (pointwise_input(r, i, 0, &x) || halo_buffer(r, i + 1, &y, &t) ||
          _sc_relu_into(ctx, x, t))
        goto done;
      break;
    }
    if (in->act == SC_ACT_RELU && reusable(r, i, 0, keep)) {
      if (_sc_relu_(ctx, r->val[in->in[0]], &y)) goto done;
      break;
    }
    if (pointwise_input(r, i, 0, &x) || _sc_act(ctx, in, x, &y)) goto done;
    break;
  case SC_OP_ADD: {
    AtenTensorHandle b = NULL;
    if (reusable(r, i, 0, keep) || reusable(r, i, 1, keep)) {
      /* accumulate into the input nothing else reads: no new buffer */
      const int j = reusable(r, i, 0, keep) ? 0 : 1;
      rc = pointwise_input(r, i, 1 - j, &b) ||
           _sc_copy(ctx, r->val[in->in[j]], b, 1) ||
           aoti_torch_new_tensor_handle(r->val[in->in[j]], &y);
    } else {
      rc = pointwise_input(r, i, 0, &x) || pointwise_input(r, i, 1, &b) ||
           _sc_add(ctx, x, b, &y);
    }
    _sc_drop(&b);
    if (rc) goto done;
    break;
  }
  default:
    sc_fail(&ctx->err, "streamcnn: internal error: opcode %d", in->op);
    goto done;
  }
  r->val[i + 1] = y;
  y = NULL;
  if (keep && i >= r->keep_from) { /* avg-pool divisor map, for this
                                       layer's backward */
    r->aux[i] = aux;
    aux = NULL;
  }
  rc = SC_OK;
done:
  _sc_drop(&x);
  _sc_drop(&y);
  _sc_drop(&aux);
  _sc_drop(&t);
  return rc;
}

/* Views of the flat strips store: row tile t's band of value v (N x C x
 * halo rows x band width) and tile (t, c)'s left strip (N x C x own rows x
 * halo cols), contiguous. */
static int band_view(run *r, int64_t t, int64_t v, AtenTensorHandle *out) {
  int64_t rows[2];
  halo_span(r, 0, t, v, rows);
  const int64_t shape[4] = {r->batch, r->p->channels[v], rows[1] - rows[0],
                            band_width(r, v)};
  return _sc_flat_view(r->ctx, r->strips, r->band_off[t * r->nv + v], shape,
                       out);
}

static int lstrip_view(run *r, int64_t t, int64_t c, int64_t v,
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
static int copy_into(run *r, AtenTensorHandle dst, int64_t r0, int64_t nr,
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
 * (halo_buffer); make it the region: the top band from r->band[o], the
 * left strip from r->lhalo[o], the own span below right of them. */
static int add_halo(run *r, int64_t o) {
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  AtenTensorHandle buf = NULL, src = NULL;
  if (!has_halo(r, o)) return SC_OK;
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
static int save_halo(run *r, int64_t o) {
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
        rc_ = r->strips ? band_view(r, r->row + 1, o, &r->band_next[o])
                        : _sc_tile_buffer(r->ctx, shape, 0, &r->band_next[o]);
      }
      rc_ = rc_ || subview(r, r->val[o], rr, rc, hr, oc, &src) ||
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
      rc_ = subview(r, r->val[o], rr, rc, orr, hc, &src) ||
            (r->strips ? lstrip_view(r, r->row, r->col + 1, o, &r->lnext[o])
                       : _sc_tile_buffer(r->ctx, shape, 0, &r->lnext[o])) ||
            _sc_copy(r->ctx, r->lnext[o], src, 0);
      _sc_drop(&src);
    }
  }
  return rc_;
}

#ifdef SC_WITH_CUDA
/* Queue the copy of tile (t, c)'s pixels (value 0's region) on the side
 * stream, into a new dense device tensor of the host image's layout. */
static int prefetch_issue(run *r, int64_t t, int64_t c) {
  sc_ctx *ctx = r->ctx;
  const int64_t *rows = &r->plans[0][t]->region[0];
  const int64_t *cols = &r->plans[1][c]->region[0];
  int64_t dim, *sz, *st;
  void *base = NULL, *dst = NULL;
  sc_region_copy rc;
  char msg[256];
  if (empty(rows) || empty(cols) || r->batch == 0) return SC_OK;
  if (_sc_meta(ctx, r->call->image, &dim, &sz, &st) ||
      aoti_torch_get_data_ptr(r->call->image, &base))
    return SC_ERR;
  if (!sc_region_copy_plan(sz, st, dtype_size(ctx->image_dtype), rows, cols, &rc))
    return SC_OK;
  const int64_t shape[4] = {sz[0], sz[1], rows[1] - rows[0], cols[1] - cols[0]};
  if (!r->pf_open) {
    if (sc_prefetch_open(&r->pf, msg, sizeof msg)) {
      sc_prefetch_close(&r->pf);
      return sc_fail(&ctx->err, "streamcnn: CUDA prefetch: %s", msg);
    }
    r->pf_open = 1;
  }
  if (aoti_torch_empty_strided(4, shape, rc.dst_stride, ctx->image_dtype,
                               ctx->device_type, ctx->device_index, &r->pf_buf) ||
      aoti_torch_get_data_ptr(r->pf_buf, &dst))
    return sc_fail(&ctx->err, "streamcnn: could not allocate a tile buffer");
  if (sc_prefetch_copy(&r->pf, ctx->stream, dst, base, &rc, msg, sizeof msg))
    return sc_fail(&ctx->err, "streamcnn: CUDA prefetch: %s", msg);
  r->pf_span[0][0] = rows[0];
  r->pf_span[0][1] = rows[1];
  r->pf_span[1][0] = cols[0];
  r->pf_span[1][1] = cols[1];
  return SC_OK;
}
#endif

/* An image in host memory (r->val[0], a view of it) for the current tile:
 * the side stream's copy when it was prefetched; else pinned memory is read
 * by the gather kernel itself (the tile crosses PCIe once, converted and
 * normalised on the device) and pageable memory is first copied to a
 * device tensor of the image's dtype. Queues the next tile's prefetch. */
static int host_tile(run *r) {
#ifdef SC_WITH_CUDA
  void *ptr = NULL;
  int64_t dim, *sz, *st;
  char msg[256];
  r->host_direct = 0;
  if (r->pf_buf) { /* the side stream's copy, if it is this tile's */
    const int hit = same(r->pf_span[0], region(r, 0, 0)) &&
                    same(r->pf_span[1], region(r, 1, 0));
    if (sc_prefetch_wait(&r->pf, r->ctx->stream, msg, sizeof msg))
      return sc_fail(&r->ctx->err, "streamcnn: CUDA prefetch: %s", msg);
    if (hit) {
      _sc_drop(&r->val[0]);
      r->val[0] = r->pf_buf;
      r->pf_buf = NULL;
    } else {
      _sc_drop(&r->pf_buf); /* stream-ordered after the wait: safe */
    }
  }
  if (r->img_pinned && r->next_tile[0] >= 0 &&
      prefetch_issue(r, r->next_tile[0], r->next_tile[1]))
    return SC_ERR;
  int32_t dt;
  if (aoti_torch_get_device_type(r->val[0], &dt) ||
      aoti_torch_get_data_ptr(r->val[0], &ptr))
    return sc_fail(&r->ctx->err, "streamcnn: cannot read the image's data");
  if (dt != aoti_torch_device_type_cpu()) return SC_OK; /* prefetched */
  if (!ptr) return SC_OK;
  if (sc_cuda_host_mapped(ptr)) { /* read directly by the gather */
    r->host_direct = 1;
    return SC_OK;
  }
  AtenTensorHandle dev = NULL;
  if (_sc_meta(r->ctx, r->val[0], &dim, &sz, &st) ||
      _sc_empty_as(r->ctx, r->ctx->image_dtype, 4, sz, 0, &dev) ||
      _sc_copy_across(r->ctx, dev, r->val[0])) {
    _sc_drop(&dev);
    return SC_ERR;
  }
  _sc_drop(&r->val[0]);
  r->val[0] = dev;
  return SC_OK;
#else
  return sc_fail(&r->ctx->err, "streamcnn: this library was built without CUDA");
#endif
}

/* After a kernel that read the pinned host image: the point the call
 * waits for before it returns (run_release). */
static int mark_host_reads(run *r) {
#ifdef SC_WITH_CUDA
  char msg[256];
  if (sc_host_reads_mark(&r->host_ev, r->ctx->stream, msg, sizeof msg))
    return sc_fail(&r->ctx->err, "streamcnn: CUDA event: %s", msg);
  return SC_OK;
#else
  return sc_fail(&r->ctx->err, "streamcnn: this library was built without CUDA");
#endif
}

/* Instruction 0 is a per-channel affine map of the image read by nothing
 * else, e.g. the mean / std normalisation a StreamingModule puts in front
 * (a depthwise 1 x 1 convolution, stride 1, no padding, no folded batch
 * norm), whose weight takes no gradient in this call: the image gather
 * applies it (_sc_gather_affine), so neither the image tile in the
 * computation's dtype nor a convolution pass over it exists. The
 * convolution's backward needs only the input's shape then. */
static int image_affine_shape(const sc_program *p) {
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

static int affine_image(const run *r) {
  return image_affine_shape(r->p) && r->fused[0] < 0 &&
         !(r->mask && r->mask[1 + r->p->instr[0].weight]);
}

/* Instruction 0 through the image gather (affine_image): the tile's own
 * span of value 1, normalised straight from the image's pixels. */
static int affine_image_forward(run *r, AtenTensorHandle *y) {
  const sc_instr *in = &r->p->instr[0];
  AtenTensorHandle src = NULL;
  *y = NULL;
  if (subview(r, r->val[0], region(r, 0, 0), region(r, 1, 0),
              readspan(r, 0, 0, 0), readspan(r, 1, 0, 0), &src))
    return SC_ERR;
  const int nhwc = r->ctx->tiles_nhwc || _sc_is_channels_last(r->ctx, src);
  int rc = _sc_gather_affine(r->ctx, src, r->batch, in->c_in, nhwc,
                             param(r, in->weight),
                             in->bias >= 0 ? param(r, in->bias) : NULL, y);
  _sc_drop(&src);
  if (!rc) _sc_count_macs(*y, 1.0);
  if (!rc && r->host_direct) rc = mark_host_reads(r);
  return rc;
}

/* Replace the tile's image view r->val[0] with a dense copy in the
 * computation's dtype (a uint8 image normalised by the gather), NHWC or
 * NCHW. */
static int copy_image_tile(run *r, int nhwc) {
  AtenTensorHandle px = r->val[0];
  const int64_t *rh = region(r, 0, 0), *rw = region(r, 1, 0);
  r->val[0] = NULL;
  const int rc = _sc_gather(r->ctx, px, r->batch, r->p->channels[0],
                            rh[1] - rh[0], rw[1] - rw[0], 0, 0, 0.0, nhwc,
                            &r->val[0]);
  _sc_drop(&px);
  return rc;
}

/* Forward of the current tile's cone. Each value is freed once its last
 * consumer ran, unless keep = 1 and a backward op reads it (r->keep). */
static int forward_tile(run *r, int keep) {
  const sc_program *p = r->p;
  const int64_t out_v = p->n_instr;
  if (!value_empty(r, 0)) {
    if (subview(r, r->call->image, (const int64_t[2]){0, r->sizes[0]},
                (const int64_t[2]){0, r->sizes[1]}, region(r, 0, 0),
                region(r, 1, 0), &r->val[0]))
      return SC_ERR;
    if (r->ctx->image_host && host_tile(r)) return SC_ERR;
    if (affine_image(r)) {
      /* instruction 0 reads the pixels themselves */
    } else if (r->ctx->image_u8 || r->ctx->image_host) { /* pixels -> tile */
      if (copy_image_tile(r, r->ctx->tiles_nhwc)) return SC_ERR;
      if (r->host_direct && mark_host_reads(r)) return SC_ERR;
    } else if (r->nhwc_image && !_sc_is_channels_last(r->ctx, r->val[0])) {
      /* a pool or pointwise op of the image keeps its layout: a
       * channels-last copy keeps the tile channels-last (a convolution of
       * the image takes a channels-last copy anyway, layer_input); in
       * NCHW oneDNN pads few channels to blocks of 16 in its copies */
      if (copy_image_tile(r, 1)) return SC_ERR;
    }
  }
  for (int64_t v = 0; v < r->nv; v++) r->left[v] = p->n_consumers[v];
  for (int64_t i = 0; i < p->n_instr; i++) {
    if (value_empty(r, i + 1)) continue; /* only padding reads it */
    if (!empty(own(r, 0, i + 1)) && !empty(own(r, 1, i + 1)) &&
        forward_instr(r, i, keep))
      return SC_ERR;
    if (r->cached && (add_halo(r, i + 1) || save_halo(r, i + 1)))
      return SC_ERR;
    const sc_instr *in = &p->instr[i];
    for (int j = 0; j < in->n_in; j++) {
      const int64_t v = in->in[j];
      if (--r->left[v] == 0 && v != out_v && !kept(r, v, keep))
        _sc_drop(&r->val[v]);
    }
  }
  return SC_OK;
}

/* ---- progress ------------------------------------------------------------- */

static _Thread_local sc_progress_fn t_progress;
static _Thread_local void *t_progress_user;

void sc_set_progress(sc_progress_fn fn, void *user) {
  t_progress = fn;
  t_progress_user = user;
}

static void report(int phase, int64_t done, int64_t total) {
  if (t_progress) t_progress(t_progress_user, phase, done, total);
}

/* ---- forward ---------------------------------------------------------------- */

/* Cached plans: make row tile t, column tile c the current tile. */
static void select_cached(run *r, int64_t t, int64_t c) {
  r->row = t;
  r->col = c;
  r->cur[0] = r->plans[0][t];
  r->cur[1] = r->plans[1][c];
}

/* Forward of the current tile into the stem output out. */
static int forward_into(run *r, AtenTensorHandle out) {
  const int64_t ov = r->p->n_instr;
  const int64_t *rs = own(r, 0, ov), *cs = own(r, 1, ov);
  AtenTensorHandle dst = NULL;
  int rc = forward_tile(r, 0);
  if (!rc && !empty(rs) && !empty(cs))
    rc = _sc_view(r->ctx, out, rs[0], rs[1] - rs[0], cs[0], cs[1] - cs[0],
                  &dst) ||
         _sc_copy(r->ctx, dst, r->val[ov], 0);
  _sc_drop(&dst);
  run_tile_release(r);
  return rc;
}

int _sc_forward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle *out,
                AtenTensorHandle *strips) {
  run r;
  *out = NULL;
  if (strips) *strips = NULL;
  sc_call cached_call = *call; /* the forward always caches halos */
  cached_call.cached = 1;
  int rc = run_init(&r, ctx, &cached_call);
  const int64_t ov = call->prog->n_instr;
  if (!rc) {
    const int64_t shape[4] = {r.batch, call->prog->channels[ov],
                              r.sizes[2 * ov], r.sizes[2 * ov + 1]};
    rc = _sc_empty(ctx, 4, shape, out);
  }
  if (!rc && strips) { /* the halos the backward will need, all of them */
    const int64_t n[1] = {r.strip_total};
    rc = _sc_empty(ctx, 1, n, strips);
    r.strips = *strips;
  }
  if (!rc) release_free_pages(ctx);
  /* row by row, left to right, halos carried along */
  r.sweep = 1;
  int64_t k = 0;
  for (int64_t t = 0; !rc && t < r.n_tiles[0]; t++) {
    move_all(r.band, r.band_next, r.nv);
    for (int64_t c = 0; !rc && c < r.n_tiles[1]; c++) {
      move_all(r.lhalo, r.lnext, r.nv);
      select_cached(&r, t, c);
      r.next_tile[0] = c + 1 < r.n_tiles[1] ? t : t + 1;
      r.next_tile[1] = c + 1 < r.n_tiles[1] ? c + 1 : 0;
      if (r.next_tile[0] >= r.n_tiles[0]) r.next_tile[0] = -1;
      rc = forward_into(&r, *out);
      if (!rc) report(0, ++k, r.n_order);
    }
    drop_all(r.lhalo, r.nv);
    drop_all(r.lnext, r.nv);
  }
  if (rc) {
    _sc_drop(out);
    if (strips) _sc_drop(strips);
  }
  run_release(&r);
  return rc;
}

/* ---- backward of one tile ------------------------------------------------- */

static int add_grad(run *r, int64_t v, int64_t cl[2][2], AtenTensorHandle gv,
                    int mine);

/* Add g (the gradient of the span instruction i reads through slot j) into
 * the gradient of that input value. mine: g's storage may be adopted. */
static int accum_input(run *r, int64_t i, int j, AtenTensorHandle g,
                       int mine) {
  const sc_instr *in = &r->p->instr[i];
  const int64_t v = in->in[j];
  sc_ctx *ctx = r->ctx;
  const int pointwise = !_sc_is_window(in->op);
  const int64_t *rd[2];
  int64_t cl[2][2];
  AtenTensorHandle gv = NULL, dst = NULL;
  int rc;
  for (int a = 0; a < 2; a++) {
    rd[a] = pointwise ? own(r, a, i + 1) : readspan(r, a, i, j);
    clip(rd[a], r->sizes[2 * v + a], cl[a]);
    if (empty(cl[a])) return SC_OK; /* it read only padding */
  }
  if (subview(r, g, rd[0], rd[1], cl[0], cl[1], &gv)) return SC_ERR;
  if (v == 0) { /* the image: scatter-add straight into its gradient */
    rc = _sc_view(ctx, r->igrad, cl[0][0], cl[0][1] - cl[0][0], cl[1][0],
                  cl[1][1] - cl[1][0], &dst) ||
         _sc_copy(ctx, dst, gv, 1);
    _sc_drop(&dst);
  } else {
    rc = add_grad(r, v, cl, gv, mine);
  }
  _sc_drop(&gv);
  return rc;
}

/* Add gv (borrowed: the gradient of value v over the spans cl, inside v's
 * region) into grad[v]. mine: gv's storage may be adopted. */
static int add_grad(run *r, int64_t v, int64_t cl[2][2], AtenTensorHandle gv,
                    int mine) {
  sc_ctx *ctx = r->ctx;
  AtenTensorHandle dst = NULL;
  int rc = SC_ERR;
  const int64_t *rv[2] = {region(r, 0, v), region(r, 1, v)};
  const int whole = cl[0][0] == rv[0][0] && cl[0][1] == rv[0][1] &&
                    cl[1][0] == rv[1][0] && cl[1][1] == rv[1][1];
  if (!r->grad[v] && whole && mine) { /* adopt */
    if (aoti_torch_new_tensor_handle(gv, &r->grad[v]))
      return sc_fail(&ctx->err, "streamcnn: cannot reference a tensor");
    r->grad_mine[v] = 1;
    return SC_OK;
  }
  if (r->grad[v] && !r->grad_mine[v]) { /* never write what is not ours */
    AtenTensorHandle copy = NULL;
    int64_t dim, *sz, *st;
    if (_sc_meta(ctx, r->grad[v], &dim, &sz, &st) ||
        _sc_tile_buffer(ctx, sz, 0, &copy) ||
        _sc_copy(ctx, copy, r->grad[v], 0)) {
      _sc_drop(&copy);
      goto done;
    }
    _sc_drop(&r->grad[v]);
    r->grad[v] = copy;
    r->grad_mine[v] = 1;
  }
  if (!r->grad[v]) {
    const int64_t shape[4] = {r->batch, r->p->channels[v],
                              rv[0][1] - rv[0][0], rv[1][1] - rv[1][0]};
    if (whole) {
      rc = _sc_tile_buffer(ctx, shape, 0, &r->grad[v]) ||
           _sc_copy(ctx, r->grad[v], gv, 0);
      r->grad_mine[v] = 1;
      goto done;
    }
    if (_sc_tile_buffer(ctx, shape, 1, &r->grad[v])) goto done;
    r->grad_mine[v] = 1;
  }
  rc = subview(r, r->grad[v], rv[0], rv[1], cl[0], cl[1], &dst) ||
       _sc_copy(ctx, dst, gv, 1);
done:
  _sc_drop(&dst);
  return rc;
}

/* *sum += *t (owned; adopted when *sum is NULL), *t dropped. */
static int accum_sum(sc_ctx *ctx, AtenTensorHandle *sum, AtenTensorHandle *t) {
  if (!*sum) {
    *sum = *t;
    *t = NULL;
    return SC_OK;
  }
  int rc = _sc_copy(ctx, *sum, *t, 1);
  _sc_drop(t);
  return rc;
}

/* Sum a parameter gradient (owned t) over tiles and uses; in float32 for
 * half-precision computations (the caller converts at the end). */
static int accum_param(run *r, int64_t k, AtenTensorHandle *t) {
  if (!r->pgrad[k] && _sc_is_half(r->ctx)) {
    int64_t dim, *sz, *st;
    if (_sc_meta(r->ctx, *t, &dim, &sz, &st) ||
        _sc_empty_as(r->ctx, aoti_torch_dtype_float32(), dim, sz, 1,
                     &r->pgrad[k])) {
      _sc_drop(t);
      return SC_ERR;
    }
  }
  return accum_sum(r->ctx, &r->pgrad[k], t);
}

static int wants(const run *r, int64_t k) { return k >= 0 && r->mask[1 + k]; }

/* The four parameters of convolution i and its folded batch norm, and
 * which of their gradients are wanted. */
static void fused_params(const run *r, int64_t i, int64_t k[4], int want[4]) {
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
 * (the four gradients are linear in them: fold_grads_finish). */
static int fused_conv_backward(run *r, int64_t i, AtenTensorHandle g) {
  const sc_instr *in = &r->p->instr[i];
  int64_t k[4];
  int want[4];
  fused_params(r, i, k, want);
  const int sums = want[1] || want[2] || want[3];
  /* g's per-channel sum is the convolution's bias gradient: one call */
  const int m[3] = {r->needs[in->in[0]], want[0] || want[2], sums};
  AtenTensorHandle x = NULL, res[3] = {NULL, NULL, NULL};
  int rc = SC_OK;
  if (m[0] || m[1])
    rc = (m[1] ? layer_input(r, i, 0, 0.0, &x) : layer_shape(r, i, 0, &x)) ||
         _sc_conv_backward(r->ctx, g, x, r->fold[4 * i], in, m, res) ||
         (m[0] && accum_input(r, i, 0, res[0], 1)) ||
         (m[1] && accum_sum(r->ctx, &r->fsum[2 * i], &res[1]));
  else if (sums)
    rc = _sc_channel_sum(r->ctx, g, &res[2]);
  if (!rc && sums) rc = accum_sum(r->ctx, &r->fsum[2 * i + 1], &res[2]);
  _sc_drop(&x);
  for (int j = 0; j < 3; j++) _sc_drop(&res[j]);
  return rc;
}

/* After the last tile: each fused pair's parameter gradients from its sums
 * (_sc_fold_bn_grads), added to the parameters' (which other uses of the
 * same tensors may share). */
static int fold_grads_finish(run *r) {
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
      if (!rc && want[j]) rc = accum_param(r, k[j], &pg[j]);
    for (int j = 0; j < 4; j++) _sc_drop(&pg[j]);
    if (rc) return SC_ERR;
  }
  return SC_OK;
}

static int backward_instr(run *r, int64_t i) {
  const sc_instr *in = &r->p->instr[i];
  sc_ctx *ctx = r->ctx;
  const int64_t o = i + 1;
  AtenTensorHandle g = NULL, y = NULL, x = NULL, gi = NULL, t = NULL;
  AtenTensorHandle res[3] = {NULL, NULL, NULL};
  const int need_in = r->needs[in->in[0]];
  int rc = SC_ERR;
  /* the gradient and the output over the span this tile computed */
  if (own_view(r, r->grad[o], o, &g) ||
      (r->val[o] && own_view(r, r->val[o], o, &y)))
    goto done;
  switch (in->op) {
  case SC_OP_CONV: {
    if (r->fused[i] >= 0) {
      if (fused_conv_backward(r, i, g)) goto done;
      break;
    }
    const int m[3] = {need_in, wants(r, in->weight), wants(r, in->bias)};
    if (!m[0] && !m[1] && !m[2]) break;
    /* the padded input is rebuilt rather than held through the forward;
     * the input's gradient alone needs only its shape */
    if ((m[1] ? layer_input(r, i, 0, 0.0, &x) : layer_shape(r, i, 0, &x)) ||
        _sc_conv_backward(ctx, g, x, param(r, in->weight), in, m, res) ||
        (m[1] && accum_param(r, in->weight, &res[1])) ||
        (m[2] && accum_param(r, in->bias, &res[2])) ||
        (m[0] && accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_MAXPOOL: /* the indices again, from the kept input */
    if (need_in && (layer_input(r, i, 0, -INFINITY, &x) ||
                    _sc_maxpool(ctx, x, in, &t, &res[0]) ||
                    _sc_maxpool_backward(ctx, g, x, in, res[0], &gi) ||
                    accum_input(r, i, 0, gi, 1)))
      goto done;
    break;
  case SC_OP_AVGPOOL:
    if (!need_in) break;
    if (layer_input(r, i, 0, 0.0, &x)) goto done;
    if (r->aux[i]) { /* forward divided window sums by the divisor map */
      if (_sc_div(ctx, g, r->aux[i], &t) ||
          _sc_avgpool_backward(ctx, t, x, in, 1, &gi))
        goto done;
    } else if (_sc_avgpool_backward(ctx, g, x, in, in->divisor_override,
                                    &gi)) {
      goto done;
    }
    if (accum_input(r, i, 0, gi, 1)) goto done;
    break;
  case SC_OP_BATCHNORM: {
    if (r->fused[i] >= 0) { /* the convolution's backward does its part */
      if (need_in && accum_input(r, i, 0, g, r->grad_mine[o])) goto done;
      break;
    }
    const int m[3] = {need_in, wants(r, in->bn_weight),
                      wants(r, in->bn_bias)};
    AtenTensorHandle p4[4] = {param(r, in->bn_weight), param(r, in->bn_bias),
                              param(r, in->bn_mean), param(r, in->bn_var)};
    if (!m[0] && !m[1] && !m[2]) break;
    if ((m[1] && pointwise_input(r, i, 0, &x)) || /* x: the weight's only */
        _sc_batchnorm_backward(ctx, g, x, p4, in->eps, m, res) ||
        (m[1] && accum_param(r, in->bn_weight, &res[1])) ||
        (m[2] && accum_param(r, in->bn_bias, &res[2])) ||
        (m[0] && accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_LAYERNORM_C:
  case SC_OP_LINEAR_C: {
    const int m[3] = {need_in, wants(r, in->weight), wants(r, in->bias)};
    if (!m[0] && !m[1] && !m[2]) break;
    if ((in->op == SC_OP_LAYERNORM_C || m[1]) &&
        pointwise_input(r, i, 0, &x))
      goto done;
    if ((in->op == SC_OP_LAYERNORM_C
             ? _sc_layernorm_c_backward(ctx, g, x, param(r, in->weight),
                                        param(r, in->bias), in->eps, m, res)
             : _sc_linear_c_backward(ctx, g, x, param(r, in->weight), m,
                                     res)) ||
        (m[1] && accum_param(r, in->weight, &res[1])) ||
        (m[2] && accum_param(r, in->bias, &res[2])) ||
        (m[0] && accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_SCALE_C: {
    const int m[2] = {need_in, wants(r, in->weight)};
    if (!m[0] && !m[1]) break;
    if ((m[1] && pointwise_input(r, i, 0, &x)) ||
        _sc_scale_c_backward(ctx, g, x, param(r, in->weight), m, res) ||
        (m[1] && accum_param(r, in->weight, &res[1])) ||
        (m[0] && accum_input(r, i, 0, res[0], 1)))
      goto done;
    break;
  }
  case SC_OP_ACT:
    if (!need_in) break;
    if (in->act == SC_ACT_RELU && r->grad_mine[o]) { /* in place on g */
      if (_sc_relu_backward_(ctx, g, y) || accum_input(r, i, 0, g, 1))
        goto done;
      break;
    }
    if (!_sc_act_uses_output(in->act) && pointwise_input(r, i, 0, &x))
      goto done;
    if (_sc_act_backward(ctx, in, g, x, y, &gi) ||
        accum_input(r, i, 0, gi, 1))
      goto done;
    break;
  case SC_OP_ADD: {
    /* the same gradient flows to both inputs: the first taker may adopt
     * it, the second (or a taker when it is not ours) copies */
    int mine = r->grad_mine[o];
    for (int j = 0; j < 2; j++) {
      if (!r->needs[in->in[j]]) continue;
      if (accum_input(r, i, j, g, mine)) goto done;
      mine = 0;
    }
    break;
  }
  default:
    sc_fail(&ctx->err, "streamcnn: internal error: opcode %d", in->op);
    goto done;
  }
  rc = SC_OK;
done:
  _sc_drop(&g);
  _sc_drop(&y);
  _sc_drop(&x);
  _sc_drop(&gi);
  _sc_drop(&t);
  for (int k = 0; k < 3; k++) _sc_drop(&res[k]);
  return rc;
}

/* Cached plans, once every consumer of value o ran its backward: add the
 * gradients the tiles after this one left for o's positions here (the row
 * below: its bands' gradient over this tile's own columns; the tile on the
 * right: its left strip's), then pass on the part of o's gradient in this
 * tile's halo: the top band's to the row above (summed over the row, full
 * width), the left strip's to the tile on the left. */
static int pass_pending(run *r, int64_t o) {
  int64_t cl[2][2], hr[2], hc[2];
  const int64_t *rr = region(r, 0, o), *rc = region(r, 1, o);
  const int64_t *orr = own(r, 0, o), *oc = own(r, 1, o);
  AtenTensorHandle src = NULL;
  int rc_ = SC_OK;
  if (r->gband[o] && !empty(oc)) {
    halo_span(r, 0, r->row + 1, o, cl[0]);
    cl[1][0] = oc[0];
    cl[1][1] = oc[1];
    rc_ = _sc_view(r->ctx, r->gband[o], 0, cl[0][1] - cl[0][0], oc[0],
                   oc[1] - oc[0], &src) ||
          add_grad(r, o, cl, src, 0);
    _sc_drop(&src);
    if (rc_) return SC_ERR;
  }
  if (r->gleft[o]) {
    cl[0][0] = orr[0];
    cl[0][1] = orr[1];
    halo_span(r, 1, r->col + 1, o, cl[1]);
    rc_ = add_grad(r, o, cl, r->gleft[o], 0);
    _sc_drop(&r->gleft[o]);
    if (rc_) return SC_ERR;
  }
  if (!r->grad[o]) return SC_OK;
  if (r->row > 0) {
    halo_span(r, 0, r->row, o, hr);
    if (!empty(hr)) {
      if (!r->gband_up[o]) {
        const int64_t shape[4] = {r->batch, r->p->channels[o], hr[1] - hr[0],
                                  band_width(r, o)};
        if (_sc_tile_buffer(r->ctx, shape, 1, &r->gband_up[o])) return SC_ERR;
      }
      rc_ = subview(r, r->grad[o], rr, rc, hr, rc, &src) ||
            copy_into(r, r->gband_up[o], 0, hr[1] - hr[0], rc[0],
                      rc[1] - rc[0], src, 1);
      _sc_drop(&src);
      if (rc_) return SC_ERR;
    }
  }
  if (r->col > 0 && !empty(orr)) {
    halo_span(r, 1, r->col, o, hc);
    if (!empty(hc)) {
      const int64_t shape[4] = {r->batch, r->p->channels[o], orr[1] - orr[0],
                                hc[1] - hc[0]};
      rc_ = subview(r, r->grad[o], rr, rc, orr, hc, &src) ||
            _sc_tile_buffer(r->ctx, shape, 0, &r->gleft[o]) ||
            _sc_copy(r->ctx, r->gleft[o], src, 0);
      _sc_drop(&src);
    }
  }
  return rc_;
}

/* Backward of instructions top-1 down to stop (their outputs top .. stop+1),
 * starting from r->grad[top]; frees each value once its producer is done. */
static int backward_range(run *r, int64_t top, int64_t stop) {
  for (int64_t i = top - 1; i >= stop; i--) {
    const int64_t o = i + 1;
    if (r->cached && pass_pending(r, o)) return SC_ERR;
    if (r->grad[o] && !empty(own(r, 0, o)) && !empty(own(r, 1, o)) &&
        backward_instr(r, i))
      return SC_ERR;
    _sc_drop(&r->grad[o]); /* nothing later reads value o */
    _sc_drop(&r->val[o]);
    _sc_drop(&r->aux[i]);
  }
  return SC_OK;
}

/* The part of the tile's backward below the cut c: recompute values 0 .. c
 * and back-propagate r->grad[c] in row pieces of c's region, each piece
 * with its own (smaller) cone. Exact for the same reason as the tiling
 * itself: the gradient of c is a sum over its rows. */
static int backward_pieces(run *r) {
  const sc_program *p = r->p;
  const int64_t c = r->cut;
  const int64_t rows[2] = {region(r, 0, c)[0], region(r, 0, c)[1]};
  const int64_t cols[2] = {region(r, 1, c)[0], region(r, 1, c)[1]};
  const sc_axis_plan *tile_plans[2] = {r->cur[0], r->cur[1]};
  AtenTensorHandle gc = r->grad[c];
  int rc = SC_ERR;
  r->grad[c] = NULL;
  run_tile_release(r);
  sc_axis_plan *pr = sc_axis_plan_new(p), *pc = sc_axis_plan_new(p);
  if (!pr || !pc) {
    sc_fail(&r->ctx->err, "streamcnn: out of memory");
    goto done;
  }
  if (sc_plan_axis_to(p, r->sizes, 1, c, cols[0], cols[1], pc, &r->ctx->err))
    goto done;
  const int64_t n = rows[1] - rows[0];
  const int64_t k = r->pieces < n ? r->pieces : n;
  r->cur[0] = pr;
  r->cur[1] = pc;
  r->keep_from = 0;
  for (int64_t j = 0; j < k; j++) {
    const int64_t lo = rows[0] + n * j / k, hi = rows[0] + n * (j + 1) / k;
    if (sc_plan_axis_to(p, r->sizes, 0, c, lo, hi, pr, &r->ctx->err) ||
        forward_tile(r, 1))
      goto done;
    const int64_t piece[2] = {lo, hi};
    if (subview(r, gc, rows, cols, piece, cols, &r->grad[c])) goto done;
    r->grad_mine[c] = 0; /* shared by the pieces: read only */
    if (backward_range(r, c, 0)) goto done;
    run_tile_release(r);
  }
  rc = SC_OK;
done:
  r->cur[0] = tile_plans[0];
  r->cur[1] = tile_plans[1];
  _sc_drop(&gc);
  sc_axis_plan_free(pr);
  sc_axis_plan_free(pc);
  return rc;
}

static int backward_tile(run *r, AtenTensorHandle grad_out) {
  const int64_t ov = r->p->n_instr;
  r->keep_from = r->cut; /* below the cut: recomputed piecewise */
  if (forward_tile(r, 1)) return SC_ERR;
  const int64_t *rs = region(r, 0, ov), *cs = region(r, 1, ov);
  if (_sc_view(r->ctx, grad_out, rs[0], rs[1] - rs[0], cs[0], cs[1] - cs[0],
               &r->grad[ov]))
    return SC_ERR;
  r->grad_mine[ov] = 0; /* the caller's tensor: read only */
  if (backward_range(r, ov, r->cut)) return SC_ERR;
  if (r->cut && r->grad[r->cut]) return backward_pieces(r);
  return SC_OK;
}

/* Where to split each tile's backward. A cut c must separate the program:
 * no instruction after it reads a value before it. It pays where the values
 * before c hold at least twice the elements per image pixel (channels /
 * stride^2) of every value from c on, as in a ResNet stem (conv1 .. relu:
 * 64 channels at half resolution; from the max pool on: 64 channels at a
 * quarter): the backward would otherwise hold those dense values for the
 * whole tile. The earliest such cut recomputes least. The part before it
 * then runs in `pieces` row pieces, each about as heavy as the rest. */
static void choose_cut(run *r) {
  const sc_program *p = r->p;
  const int64_t n = p->n_instr;
  double *dens = malloc((size_t)r->nv * sizeof *dens);
  double *suffix = malloc((size_t)r->nv * sizeof *suffix);
  int64_t *min_in = malloc((size_t)r->nv * sizeof *min_in);
  r->cut = 0;
  r->pieces = 1;
  if (dens && suffix && min_in) {
    for (int64_t v = 0; v < r->nv; v++)
      dens[v] = (double)p->channels[v] /
                ((double)p->vstride[2 * v] * (double)p->vstride[2 * v + 1]);
    /* suffix[c]: max density of values c .. n; min_in[c]: smallest value
     * read by instructions c .. n - 1 */
    suffix[n] = dens[n];
    min_in[n] = n;
    for (int64_t c = n - 1; c >= 0; c--) {
      const sc_instr *in = &p->instr[c];
      suffix[c] = dens[c] > suffix[c + 1] ? dens[c] : suffix[c + 1];
      min_in[c] = min_in[c + 1];
      for (int j = 0; j < in->n_in; j++)
        if (in->in[j] < min_in[c]) min_in[c] = in->in[j];
    }
    double prefix = 0.0; /* max density of values 1 .. c - 1 */
    for (int64_t c = 2; c < n && !r->cut; c++) {
      if (dens[c - 1] > prefix) prefix = dens[c - 1];
      if (min_in[c] >= c && prefix >= 2.0 * suffix[c]) {
        r->cut = c;
        r->pieces = (int64_t)ceil(prefix / suffix[c]);
      }
    }
  }
  free(dens);
  free(suffix);
  free(min_in); /* on allocation failure: no split, correct, only heavier */
}

/* ---- backward ---------------------------------------------------------------- */

/* Shape, strides (borrowed: valid while t lives), dtype and device of t;
 * on failure what names t (`what`) goes into the error. */
static int describe(sc_ctx *ctx, AtenTensorHandle t, const char *what,
                    int64_t *dim, int64_t **sz, int64_t **st, int32_t *dtype,
                    int32_t *dt, int32_t *di) {
  int32_t layout;
  if (aoti_torch_get_layout(t, &layout))
    return sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
  if (layout != aoti_torch_layout_strided())
    return sc_fail(&ctx->err,
                   "streamcnn: %s must be a dense (strided) tensor, not "
                   "sparse or mkldnn: call .to_dense()",
                   what);
  if (_sc_meta(ctx, t, dim, sz, st) || aoti_torch_get_dtype(t, dtype) ||
      aoti_torch_get_device_type(t, dt) || aoti_torch_get_device_index(t, di))
    return sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
  return SC_OK;
}

/* dtype and device are those of the computation. */
static int on_compute(const sc_ctx *ctx, int32_t dtype, int32_t dt,
                      int32_t di) {
  return dtype == ctx->dtype && dt == ctx->device_type &&
         di == ctx->device_index;
}

static int zeros_like(sc_ctx *ctx, AtenTensorHandle t, AtenTensorHandle *out) {
  int64_t dim, *sz, *st, strides[8];
  int32_t dtype, dt, di;
  *out = NULL;
  if (describe(ctx, t, "a parameter", &dim, &sz, &st, &dtype, &dt, &di))
    return SC_ERR;
  if (dim > 8)
    return sc_fail(&ctx->err, "streamcnn: cannot read a parameter");
  int64_t acc = 1;
  for (int64_t i = dim - 1; i >= 0; i--) {
    strides[i] = acc;
    acc *= sz[i] > 1 ? sz[i] : 1;
  }
  if (aoti_torch_empty_strided(dim, sz, strides, dtype, dt, di, out) ||
      aoti_torch_zero_(*out)) {
    _sc_drop(out);
    return sc_fail(&ctx->err, "streamcnn: could not allocate a gradient");
  }
  return SC_OK;
}

int _sc_backward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle grad_out,
                 const int *mask, AtenTensorHandle *grads) {
  const sc_program *p = call->prog;
  const int64_t ov = p->n_instr;
  run r;
  for (int64_t k = 0; k <= p->n_params; k++) grads[k] = NULL;
  int rc = run_init(&r, ctx, call);
  r.mask = mask;
  if (!rc && mask[0] && ctx->image_u8)
    rc = sc_fail(&ctx->err, "streamcnn: a uint8 image has no gradient "
                            "(output_mask[0] must be false)");
  if (!rc && mask[0] && ctx->image_host)
    rc = sc_fail(&ctx->err, "streamcnn: an image in host memory streamed to "
                            "the device has no gradient (output_mask[0] must "
                            "be false); move it to the device to "
                            "differentiate it");
  if (!rc) { /* check grad_output against the forward's output */
    int64_t dim, *sz, *st;
    int32_t dtype, dt, di;
    const int64_t want[4] = {r.batch, p->channels[ov], r.sizes[2 * ov],
                             r.sizes[2 * ov + 1]};
    rc = describe(ctx, grad_out, "grad_output", &dim, &sz, &st, &dtype, &dt,
                  &di);
    if (!rc && (dim != 4 || sz[0] != want[0] || sz[1] != want[1] ||
                sz[2] != want[2] || sz[3] != want[3]))
      rc = sc_fail(&ctx->err,
                   "streamcnn: grad_output must have the stem output's shape "
                   "[%lld, %lld, %lld, %lld]",
                   (long long)want[0], (long long)want[1], (long long)want[2],
                   (long long)want[3]);
    else if (!rc && !on_compute(ctx, dtype, dt, di))
      rc = sc_fail(&ctx->err,
                   "streamcnn: grad_output must have the image's dtype and "
                   "device");
  }
  if (!rc) {
    _sc_needs(p, mask, r.fused, r.needs);
    _sc_keep_set(p, r.needs, mask, r.fused, r.keep);
    if (!r.cached) choose_cut(&r);
  }
  if (!rc && mask[0]) {
    int64_t dim, *sz, *st;
    rc = _sc_meta(ctx, call->image, &dim, &sz, &st) ||
         _sc_zeros(ctx, 4, sz, &r.igrad);
  }
  if (!rc && r.needs[ov] && r.batch > 0) release_free_pages(ctx);
  if (!rc && r.cached) { /* halos of the forward are the strips */
    int64_t dim, *sz, *st;
    int32_t dtype, dt, di;
    AtenTensorHandle s = call->strips;
    if (!s || describe(ctx, s, "strips", &dim, &sz, &st, &dtype, &dt, &di) ||
        dim != 1 || sz[0] != r.strip_total || (sz[0] > 1 && st[0] != 1) ||
        !on_compute(ctx, dtype, dt, di))
      rc = sc_fail(&ctx->err,
                   "streamcnn: strips must be the second output of "
                   "forward_cached for this image, params, program and "
                   "tile_size (a 1-D tensor of %lld elements of the compute "
                   "dtype, on the image's device)",
                   (long long)r.strip_total);
    r.strips = s;
  }
  if (!rc && r.cached && r.needs[ov] && r.batch > 0) {
    /* the forward's order reversed: each tile takes its halo from the
     * strips and passes the halo's gradient on (pass_pending) */
    int64_t k = 0;
    const int64_t nc = r.n_tiles[1];
    for (int64_t t = r.n_tiles[0] - 1; !rc && t >= 0; t--) {
      for (int64_t c = nc - 1; !rc && c >= 0; c--) {
        select_cached(&r, t, c);
        r.next_tile[0] = c > 0 ? t : t - 1; /* -1 after the last */
        r.next_tile[1] = c > 0 ? c - 1 : nc - 1;
        for (int64_t v = 1; !rc && v < r.nv; v++) {
          if (r.band_off[t * r.nv + v] >= 0)
            rc = band_view(&r, t, v, &r.band[v]);
          if (!rc && r.lstrip_off[(t * nc + c) * r.nv + v] >= 0)
            rc = lstrip_view(&r, t, c, v, &r.lhalo[v]);
        }
        rc = rc || backward_tile(&r, grad_out);
        run_tile_release(&r);
        drop_all(r.band, r.nv);
        drop_all(r.lhalo, r.nv);
        if (!rc) report(1, ++k, r.n_order);
      }
      drop_all(r.gleft, r.nv);
      move_all(r.gband, r.gband_up, r.nv);
    }
  } else if (!rc && r.needs[ov] && r.batch > 0)
    for (int64_t k = 0; !rc && k < r.n_order; k++) {
      select_tile(&r, k);
      /* the tile whose pixels a pinned host image prefetches meanwhile */
      r.next_tile[0] = k + 1 < r.n_order ? r.order[k + 1] / r.n_tiles[1] : -1;
      r.next_tile[1] = k + 1 < r.n_order ? r.order[k + 1] % r.n_tiles[1] : 0;
      rc = backward_tile(&r, grad_out);
      run_tile_release(&r);
      if (!rc) report(1, k + 1, r.n_order);
    }
  if (!rc) rc = fold_grads_finish(&r);
  /* hand over the requested gradients, contiguous, zeros where unused */
  if (!rc && mask[0]) {
    grads[0] = r.igrad;
    r.igrad = NULL;
  }
  for (int64_t k = 0; !rc && k < p->n_params; k++) {
    if (!mask[1 + k]) continue;
    int32_t pd = 0, gd = 0;
    if (r.pgrad[k] && (aoti_torch_get_dtype(call->params[k], &pd) ||
                       aoti_torch_get_dtype(r.pgrad[k], &gd))) {
      rc = sc_fail(&ctx->err, "streamcnn: cannot read params[%lld]",
                   (long long)k);
    } else if (r.pgrad[k] && pd != gd) { /* float32 sum -> the dtype */
      int64_t dim, *sz, *st;
      rc = _sc_meta(ctx, r.pgrad[k], &dim, &sz, &st) ||
           _sc_empty_as(ctx, pd, dim, sz, 0, &grads[1 + k]) ||
           _sc_copy(ctx, grads[1 + k], r.pgrad[k], 0);
    } else if (r.pgrad[k]) {
      grads[1 + k] = r.pgrad[k];
      r.pgrad[k] = NULL;
      rc = _sc_make_contiguous(ctx, &grads[1 + k]);
    } else {
      rc = zeros_like(ctx, call->params[k], &grads[1 + k]);
    }
  }
  if (rc)
    for (int64_t k = 0; k <= p->n_params; k++) _sc_drop(&grads[k]);
  run_release(&r);
  return rc;
}

/* ---- validation ----------------------------------------------------------- */

static const char *dtype_name(int32_t d) {
  if (d == aoti_torch_dtype_float32()) return "float32";
  if (d == aoti_torch_dtype_float64()) return "float64";
  if (d == aoti_torch_dtype_float16()) return "float16";
  if (d == aoti_torch_dtype_bfloat16()) return "bfloat16";
  return "a non-float dtype";
}

/* Check params[k] has the image's dtype and device and the given shape
 * (ndim -1: any shape of shape[0] elements with at most one dim > 1). */
static int check_param(sc_ctx *ctx, const sc_call *call, int64_t i,
                       const char *role, int64_t k, int64_t ndim,
                       const int64_t *shape, int32_t want,
                       const char *against) {
  if (k < 0) return SC_OK;
  AtenTensorHandle t = call->params[k];
  const sc_instr *in = &call->prog->instr[i];
  int64_t dim, *sz, *st;
  int32_t dtype, dt, di;
  char what[40];
  snprintf(what, sizeof what, "params[%lld]", (long long)k);
  if (describe(ctx, t, what, &dim, &sz, &st, &dtype, &dt, &di))
    return SC_ERR;
  if (dtype != want)
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) is "
                   "%s but %s %s: convert the module and the image to one "
                   "dtype%s",
                   (long long)k, role, (long long)i, _sc_op_name(in->op),
                   dtype_name(dtype),
                   against, dtype_name(want),
                   _sc_is_half(ctx) && in->op == SC_OP_BATCHNORM
                       ? " (a batch norm's parameters may instead all be "
                         "float32)"
                       : "");
  if (dt != ctx->device_type || di != ctx->device_index)
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) is "
                   "on another device than the image",
                   (long long)k, role, (long long)i, _sc_op_name(in->op));
  int ok;
  if (ndim < 0) { /* per-channel: shape[0] elements, one dim holds them */
    int64_t numel = 1, big = 0;
    for (int64_t d = 0; d < dim; d++) {
      numel *= sz[d];
      big += sz[d] > 1;
    }
    ok = dim >= 1 && dim <= 4 && numel == shape[0] && big <= 1;
    ndim = 1;
  } else {
    ok = dim == ndim;
    for (int64_t d = 0; ok && d < ndim; d++) ok = sz[d] == shape[d];
  }
  if (!ok) {
    char want[96] = "", got[96] = "";
    for (int64_t d = 0; d < ndim; d++)
      snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld",
               d ? ", " : "", (long long)shape[d]);
    for (int64_t d = 0; d < dim && d < 8; d++)
      snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld",
               d ? ", " : "", (long long)sz[d]);
    return sc_fail(&ctx->err,
                   "streamcnn: params[%lld] (%s of instruction %lld, %s) has "
                   "shape [%s], expected [%s]",
                   (long long)k, role, (long long)i, _sc_op_name(in->op), got,
                   want);
  }
  return SC_OK;
}

/* Whether params[k] is float32. */
static int param_float32(const sc_call *call, int64_t k) {
  int32_t dtype;
  return k >= 0 && !aoti_torch_get_dtype(call->params[k], &dtype) &&
         dtype == aoti_torch_dtype_float32();
}

/* Whether batch norm `in` holds float32 statistics (its running_mean). */
static int bn_float32(const sc_call *call, const sc_instr *in) {
  return param_float32(call, in->bn_mean);
}

int _sc_validate(sc_ctx *ctx, const sc_call *call) {
  const sc_program *p = call->prog;
  int64_t dim, *sz, *st;
  int32_t dtype, dt, di;
  if (describe(ctx, call->image, "the image tensor", &dim, &sz, &st, &dtype,
               &dt, &di))
    return SC_ERR;
  if (dim != 4)
    return sc_fail(&ctx->err,
                   "streamcnn: image must be a 4-D N x C x H x W tensor, got "
                   "%lld dimensions",
                   (long long)dim);
  ctx->image_dtype = dtype;
  /* an image in host memory with the parameters on a CUDA device: tiles
   * are streamed to the device */
  if (dt == aoti_torch_device_type_cpu() && p->n_params > 0) {
    int32_t pdt, pdi;
    if (aoti_torch_get_device_type(call->params[0], &pdt) ||
        aoti_torch_get_device_index(call->params[0], &pdi))
      return sc_fail(&ctx->err, "streamcnn: cannot read params[0]");
    if (pdt == aoti_torch_device_type_cuda()) {
      ctx->image_host = 1;
      dt = pdt;
      di = pdi;
    }
  }
  ctx->image_u8 = dtype == aoti_torch_dtype_uint8();
  if (ctx->image_u8) {
    /* uint8 pixels are converted in the tile gather; the computation runs
     * in the parameters' dtype (float32 without parameters): their
     * narrowest (batch norms' and mean / std may be float32 in a half
     * precision computation), the first of two of one width */
    dtype = aoti_torch_dtype_float32();
    int width = 0;
    for (int64_t k = 0; k < p->n_params; k++) {
      int32_t d;
      if (aoti_torch_get_dtype(call->params[k], &d))
        return sc_fail(&ctx->err, "streamcnn: cannot read params[%lld]",
                       (long long)k);
      const int w = dtype_size(d);
      if (k == 0 || (w > 1 && w < width)) { /* floats only */
        dtype = d;
        width = w;
      }
    }
  }
  ctx->kdtype = _sc_kdtype(dtype);
  if (ctx->kdtype == SC_DTYPE_U8) ctx->kdtype = 0;
  if (!ctx->kdtype && ctx->image_u8)
    return sc_fail(&ctx->err,
                   "streamcnn: with a uint8 image the parameters set the "
                   "compute dtype and must be float16, bfloat16, float32 "
                   "or float64");
  if (!ctx->kdtype)
    return sc_fail(&ctx->err,
                   "streamcnn: image must be uint8, float16, bfloat16, "
                   "float32 or float64 (got dtype code %d)",
                   (int)dtype);
  ctx->dtype = dtype;
  ctx->device_type = dt;
  ctx->device_index = di;
  if (dt == aoti_torch_device_type_cuda()) {
    ctx->is_cuda = 1;
#ifndef SC_WITH_CUDA
    return sc_fail(&ctx->err,
                   "streamcnn: the image is on a CUDA device but this library "
                   "was built without CUDA (STREAMCNN_CUDA=OFF)");
#endif
  } else if (dt != aoti_torch_device_type_cpu()) {
    return sc_fail(&ctx->err,
                   "streamcnn: the image must be on the CPU or a CUDA device");
  }
  if (sz[1] != p->in_channels)
    return sc_fail(&ctx->err,
                   "streamcnn: the stem expects %lld input channels, the "
                   "image has %lld (shape [%lld, %lld, %lld, %lld])",
                   (long long)p->in_channels, (long long)sz[1],
                   (long long)sz[0], (long long)sz[1], (long long)sz[2],
                   (long long)sz[3]);
  for (int64_t i = 0; i < p->n_instr; i++) {
    const sc_instr *in = &p->instr[i];
    const int64_t c = p->channels[in->in[0]];
    const int64_t vec[1] = {c};
    int32_t want = ctx->dtype;
    const char *against = ctx->image_u8
                              ? "the computation (uint8 image: its "
                                "parameters' narrowest dtype) is"
                              : "the image is";
    if (in->op == SC_OP_BATCHNORM && _sc_is_half(ctx) &&
        bn_float32(call, in)) {
      /* float32 statistics and affine parameters with float16 / bfloat16
       * values, as torch.autocast leaves a batch norm's */
      want = aoti_torch_dtype_float32();
      against = "its running_mean is";
    } else if (i == 0 && _sc_is_half(ctx) && image_affine_shape(p) &&
               param_float32(call, in->weight)) {
      /* mean / std in float32 for a half-precision stem (the image gather
       * applies them in float32 and rounds once) */
      want = aoti_torch_dtype_float32();
      against = "its weight is";
      ctx->affine_f32 = 1;
    }
    if (in->op == SC_OP_CONV) {
      const int64_t w[4] = {in->c_out, in->c_in / in->groups, in->win[0].k,
                            in->win[1].k};
      const int64_t b[1] = {in->c_out};
      if (check_param(ctx, call, i, "weight", in->weight, 4, w,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, b,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_LAYERNORM_C) {
      if (check_param(ctx, call, i, "weight", in->weight, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, vec,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_LINEAR_C) {
      const int64_t w[2] = {in->c_out, in->c_in};
      const int64_t b[1] = {in->c_out};
      if (check_param(ctx, call, i, "weight", in->weight, 2, w,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bias, 1, b,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_SCALE_C) {
      if (check_param(ctx, call, i, "scale", in->weight, -1, vec,
                      want, against))
        return SC_ERR;
    } else if (in->op == SC_OP_BATCHNORM) {
      if (check_param(ctx, call, i, "weight", in->bn_weight, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "bias", in->bn_bias, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "running_mean", in->bn_mean, 1, vec,
                      want, against) ||
          check_param(ctx, call, i, "running_var", in->bn_var, 1, vec,
                      want, against))
        return SC_ERR;
    }
  }
  return SC_OK;
}
