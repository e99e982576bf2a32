/*
 * hostimage.c — an image in host memory with the parameters on a CUDA
 * device: the current tile's pixels on the device (the side stream's
 * prefetched copy, a direct read of pinned memory by the gather, or a
 * copy of pageable memory), the next tile's prefetch, and the events the
 * call waits for before it returns (pinned memory the gather read).
 *
 * Owns: r->pf, r->pf_buf, r->host_ev (released by _sc_run_release).
 * Calls: run.c and the CUDA helpers of kernels/tile.h. Called by
 * forward.c. Without CUDA both entry points fail cleanly.
 */
#define STREAMCNN_TORCH
#define STREAMCNN_REPLAY
#include "internal.h"

#ifdef SC_WITH_CUDA
/* Queue the copy of tile (t, c)'s pixels (value 0's region) on the side
 * stream, into a new dense device tensor of the host image's layout. The
 * region's rows are absolute; the image tensor of a band holds the rows
 * from r->img_rows[0] (run_init checked that they cover every tile's). */
static int prefetch_issue(sc_run *r, int64_t t, int64_t c) {
  sc_ctx *ctx = r->ctx;
  const int64_t *span = &r->plans[0][t]->region[0];
  const int64_t rows[2] = {span[0] - r->img_rows[0], span[1] - r->img_rows[0]};
  const int64_t *cols = &r->plans[1][c]->region[0];
  int64_t dim, *sz, *st;
  void *base = NULL, *dst = NULL;
  sc_region_copy rc;
  char msg[256];
  if (empty(rows) || empty(cols) || r->batch == 0) return SC_OK;
  if (_sc_meta(ctx, r->call->image, &dim, &sz, &st) ||
      aoti_torch_get_data_ptr(r->call->image, &base))
    return SC_ERR;
  if (!sc_region_copy_plan(sz, st, _sc_dtype_size(ctx->image_dtype), rows, cols,
                           &rc))
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
    return _sc_oom(ctx, "a tile buffer", 4, shape, ctx->image_dtype,
                   ctx->device_type);
  if (sc_prefetch_copy(&r->pf, ctx->stream, dst, base, &rc, msg, sizeof msg))
    return sc_fail(&ctx->err, "streamcnn: CUDA prefetch: %s", msg);
  r->pf_span[0][0] = span[0];
  r->pf_span[0][1] = span[1];
  r->pf_span[1][0] = cols[0];
  r->pf_span[1][1] = cols[1];
  return SC_OK;
}
#endif

#ifdef SC_WITH_CUDA
static int inside(const int64_t *s, const int64_t *hull) {
  return hull[0] <= s[0] && s[1] <= hull[1];
}

/* Whether the pending prefetch is the next tile's (r->next_tile). */
static int prefetched_next(const sc_run *r) {
  if (r->next_tile[0] < 0) return 0;
  return same(r->pf_span[0], &r->plans[0][r->next_tile[0]]->region[0]) &&
         same(r->pf_span[1], &r->plans[1][r->next_tile[1]]->region[0]);
}
#endif

/* An image in host memory (r->val[0], a view of it) for the current tile:
 * the side stream's copy when it was prefetched; else pinned memory is read
 * by the gather kernel itself (the tile crosses PCIe once, converted and
 * normalised on the device) and pageable memory is first copied to a
 * device tensor of the image's dtype. Queues the next tile's prefetch.
 *
 * The copy stays (r->px_buf) while the tile's later passes read inside it:
 * the row pieces of its backward (backward.c) and its sparse boxes
 * (sparse.c) take views of it. A pending prefetch of the next tile waits
 * for that tile instead of being dropped and copied again. */
int _sc_host_tile(sc_run *r) {
#ifdef SC_WITH_CUDA
  void *ptr = NULL;
  int64_t dim, *sz, *st;
  char msg[256];
  const int64_t *rows = region(r, 0, 0), *cols = region(r, 1, 0);
  r->host_direct = 0;
  if (r->pf_buf) {
    if (inside(rows, r->pf_span[0]) && inside(cols, r->pf_span[1])) {
      if (sc_prefetch_wait(&r->pf, r->ctx->stream, msg, sizeof msg))
        return sc_fail(&r->ctx->err, "streamcnn: CUDA prefetch: %s", msg);
      _sc_drop(&r->px_buf); /* stream-ordered after the wait: safe */
      r->px_buf = r->pf_buf;
      r->pf_buf = NULL;
      memcpy(r->px_span, r->pf_span, sizeof r->px_span);
    } else if (!prefetched_next(r)) {
      if (sc_prefetch_wait(&r->pf, r->ctx->stream, msg, sizeof msg))
        return sc_fail(&r->ctx->err, "streamcnn: CUDA prefetch: %s", msg);
      _sc_drop(&r->pf_buf);
    }
  }
  if (r->px_buf) {
    if (inside(rows, r->px_span[0]) && inside(cols, r->px_span[1])) {
      _sc_drop(&r->val[0]);
      if (_sc_subview(r, r->px_buf, r->px_span[0], r->px_span[1], rows, cols,
                      &r->val[0]))
        return SC_ERR;
    } else {
      _sc_drop(&r->px_buf); /* an earlier tile's */
    }
  }
  if (r->img_pinned && r->next_tile[0] >= 0 && !r->pf_buf &&
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
 * waits for before it returns (_sc_run_release). */
int _sc_mark_host_reads(sc_run *r) {
#ifdef SC_WITH_CUDA
  char msg[256];
  if (sc_host_reads_mark(&r->host_ev, r->ctx->stream, msg, sizeof msg))
    return sc_fail(&r->ctx->err, "streamcnn: CUDA event: %s", msg);
  return SC_OK;
#else
  return sc_fail(&r->ctx->err, "streamcnn: this library was built without CUDA");
#endif
}
