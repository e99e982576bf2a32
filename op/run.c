/*
 * run.c — the run state of one replay call (sc_run, internal.h) and what
 * every room shares: lifetimes (_sc_run_release, _sc_run_tile_release,
 * _sc_drop_all, _sc_move_all), the tile order (largest cone first) and
 * the current tile, views of spans (_sc_subview), gradient accumulation
 * into values, the image and parameter sums (_sc_add_grad,
 * _sc_accum_input, _sc_accum_param), and progress reports.
 *
 * The bottom room of the replay: calls only aten.c / tiles.c (internal.h)
 * and the geometry's plans; everything else in the replay calls it.
 * Ownership: a `sc_run` owns every handle stored in it; _sc_run_tile_release
 * frees a tile's, _sc_run_release all of them. Borrowed inputs (image,
 * params, grad_output) are only read, never written.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif


/* New reference to `t` restricted to the absolute spans (rows, cols), given
 * that t covers the absolute spans (trow, tcol). */
int _sc_subview(sc_run *r, AtenTensorHandle t, const int64_t *trow,
                const int64_t *tcol, const int64_t *row, const int64_t *col,
                AtenTensorHandle *out) {
  if (row[0] == trow[0] && row[1] == trow[1] && col[0] == tcol[0] &&
      col[1] == tcol[1]) {
    if (aoti_torch_new_tensor_handle(t, out))
      return sc_fail(&r->ctx->err, "streamcnn: cannot reference a tensor");
    return SC_OK;
  }
  return _sc_view(r->ctx, t, row[0] - trow[0], row[1] - row[0],
                  col[0] - tcol[0], col[1] - col[0], out);
}

/* Elements the tile's cone holds (sum over values of region area x
 * channels): a proxy for its buffer sizes (double: no overflow). */
static double cone_size(const sc_run *r, int64_t t) {
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
 * (glibc keeps such blocks; see _sc_release_free_pages). Order is irrelevant to
 * the result beyond the summation order of weight gradients. */
int _sc_order_tiles(sc_run *r) {
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

void _sc_select_tile(sc_run *r, int64_t k) {
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
void _sc_release_free_pages(const sc_ctx *ctx) {
#if defined(__GLIBC__)
  if (!ctx->is_cuda) malloc_trim(0);
#else
  (void)ctx;
#endif
}

void _sc_run_tile_release(sc_run *r) {
  for (int64_t v = 0; v < r->nv; v++) {
    _sc_drop(&r->val[v]);
    _sc_drop(&r->grad[v]);
    r->grad_mine[v] = 0;
  }
  for (int64_t i = 0; i < r->p->n_instr; i++) _sc_drop(&r->aux[i]);
}

void _sc_drop_all(AtenTensorHandle *h, int64_t n) {
  if (h)
    for (int64_t v = 0; v < n; v++) _sc_drop(&h[v]);
}

/* dst[v] = src[v] (moved; dst's old handles released). */
void _sc_move_all(AtenTensorHandle *dst, AtenTensorHandle *src, int64_t n) {
  for (int64_t v = 0; v < n; v++) {
    _sc_drop(&dst[v]);
    dst[v] = src[v];
    src[v] = NULL;
  }
}

void _sc_run_release(sc_run *r) {
#ifdef SC_WITH_CUDA
  if (r->pf_open) sc_prefetch_close(&r->pf); /* waits for its copies */
  /* the caller may free the pinned image once the call returns */
  sc_host_reads_wait(&r->host_ev);
#endif
  _sc_drop(&r->pf_buf);
  _sc_drop(&r->px_buf);
  for (int a = 0; a < 2; a++) sc_axis_plan_free(r->box_plan[a]);
  if (r->val && r->grad && r->grad_mine && r->aux) _sc_run_tile_release(r);
  AtenTensorHandle **arrays[] = HALO_ARRAYS(r);
  for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++) {
    _sc_drop_all(*arrays[k], r->nv);
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
  if (r->fold) _sc_drop_all(r->fold, 4 * r->p->n_instr);
  if (r->fsum) _sc_drop_all(r->fsum, 2 * r->p->n_instr);
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

/* ---- progress ------------------------------------------------------------- */

static _Thread_local sc_progress_fn t_progress;
static _Thread_local void *t_progress_user;

void sc_set_progress(sc_progress_fn fn, void *user) {
  t_progress = fn;
  t_progress_user = user;
}

void _sc_report(int phase, int64_t done, int64_t total) {
  if (t_progress) t_progress(t_progress_user, phase, done, total);
}

/* Cached plans: make row tile t, column tile c the current tile. */
void _sc_select_cached(sc_run *r, int64_t t, int64_t c) {
  r->row = t;
  r->col = c;
  r->cur[0] = r->plans[0][t];
  r->cur[1] = r->plans[1][c];
}

/* Add g (the gradient of the span instruction i reads through slot j) into
 * the gradient of that input value. mine: g's storage may be adopted. */
int _sc_accum_input(sc_run *r, int64_t i, int j, AtenTensorHandle g, int mine) {
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
  if (_sc_subview(r, g, rd[0], rd[1], cl[0], cl[1], &gv)) return SC_ERR;
  if (v == 0) { /* the image: scatter-add straight into its gradient */
    rc = _sc_view(ctx, r->igrad, cl[0][0] - r->img_rows[0], /* its rows */
                  cl[0][1] - cl[0][0], cl[1][0],
                  cl[1][1] - cl[1][0], &dst) ||
         _sc_copy(ctx, dst, gv, 1);
    _sc_drop(&dst);
  } else {
    rc = _sc_add_grad(r, v, cl, gv, mine);
  }
  _sc_drop(&gv);
  return rc;
}

/* Add gv (borrowed: the gradient of value v over the spans cl, inside v's
 * region) into grad[v]. mine: gv's storage may be adopted. */
int _sc_add_grad(sc_run *r, int64_t v, int64_t cl[2][2], AtenTensorHandle gv,
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
  rc = _sc_subview(r, r->grad[v], rv[0], rv[1], cl[0], cl[1], &dst) ||
       _sc_copy(ctx, dst, gv, 1);
done:
  _sc_drop(&dst);
  return rc;
}

/* *sum += *t (owned; adopted when *sum is NULL), *t dropped. */
int _sc_accum_sum(sc_ctx *ctx, AtenTensorHandle *sum, AtenTensorHandle *t) {
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
int _sc_accum_param(sc_run *r, int64_t k, AtenTensorHandle *t) {
  if (!r->pgrad[k] && _sc_is_half(r->ctx)) {
    int64_t dim, *sz, *st;
    if (_sc_meta(r->ctx, *t, &dim, &sz, &st) ||
        _sc_empty_as(r->ctx, aoti_torch_dtype_float32(), dim, sz, 1,
                     &r->pgrad[k])) {
      _sc_drop(t);
      return SC_ERR;
    }
  }
  return _sc_accum_sum(r->ctx, &r->pgrad[k], t);
}
