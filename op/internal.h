/*
 * internal.h — private declarations shared by the files of op/.
 * Public API: streamcnn.h (sc_*). Internal: _sc_* here. Helpers: static.
 */
#ifndef STREAMCNN_INTERNAL_H
#define STREAMCNN_INTERNAL_H

#include "streamcnn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- program / geometry (op/program.c, op/geometry.c; no torch) ---------- */

const char *_sc_op_name(int op);
int _sc_is_window(int op);

/* Tile boundaries along one axis for output tiles of t_out (from
 * _sc_tiling) and an input tile edge tile_in: bounds[0 .. n] with n =
 * ceil(output extent / t_out) (bounds must hold n + 1). Cone plans
 * (cached = 0): tiles of t_out, the last the remainder. Cached plans: the
 * first tile, which reads its whole cone while the others read only their
 * own part and a thin halo, shrunk until it reads about as much as the
 * next; the others share the rest in tiles of one size (the last the
 * remainder), none reading more than tile_in.
 * plan is scratch from sc_axis_plan_new. */
int _sc_tile_bounds(const sc_program *p, const int64_t *sizes, int axis,
                    int64_t t_out, int64_t tile_in, int cached,
                    sc_axis_plan *plan, int64_t *bounds, sc_error *err);

/* _sc_tile_bounds over the output span [b, e) of the axis alone (an
 * output row band, tile-parallel streaming): bounds[0] = b .. bounds[n] =
 * e, n = ceil((e - b) / t_out), absolute coordinates; with cached the
 * band's first tile reads its whole cone (see _sc_plan_axis_cached_from).
 * _sc_tile_bounds is the span [0, extent). */
int _sc_tile_bounds_range(const sc_program *p, const int64_t *sizes,
                          int axis, int64_t b, int64_t e, int64_t t_out,
                          int64_t tile_in, int cached, sc_axis_plan *plan,
                          int64_t *bounds, sc_error *err);

/* sc_plan_axis_cached for tiles that start at output row (or col) base
 * instead of 0: the tile owning [lo, hi) had predecessors owning
 * [base, lo); the first (lo == base) owns its whole cone (own = region, no
 * halo), as if nothing before base existed, while the borders of the
 * values stay where they are (sizes). base = 0: sc_plan_axis_cached. */
int _sc_plan_axis_cached_from(const sc_program *p, const int64_t *sizes,
                              int axis, int64_t base, int64_t lo, int64_t hi,
                              sc_axis_plan *plan, sc_error *err);

/* A cached tile's plans (full, rows and cols) restricted to a sparse
 * gradient: seed[4 v .. 4 v + 3] boxes (rows, cols, absolute; empty: all 0)
 * the non-zero gradient value v gets from outside the tile's backward
 * (output, pending halo gradients). v's region becomes the hull of its seed
 * and of what its consumers read for their own spans, its own span the
 * region's part in the full own span (the rest is halo). out: scratch. */
int _sc_plan_restrict(const sc_program *p, const int64_t *sizes,
                      const sc_axis_plan *const full[2], const int64_t *seed,
                      sc_axis_plan *const out[2], sc_error *err);

/* Output tile edge per axis for an input tile of tile_h x tile_w, capped at
 * the output extent; fails with the minimum tile when it is too small. */
int _sc_tiling(const sc_program *p, const int64_t *sizes, int64_t tile_h,
               int64_t tile_w, int64_t tile_out[2], sc_error *err);

/* Decode a program and tile an h x w image with it: the shared start of
 * sc_tiling_info, sc_tile_bounds, sc_work_info and sc_memory_info. On
 * success *p, *sizes (per value extents) and tile_out are set; the caller
 * frees *p (sc_program_free) and *sizes (free) either way. */
int _sc_decode_and_tile(const int64_t *words, int64_t n_words, int64_t h,
                        int64_t w, int64_t tile_h, int64_t tile_w,
                        sc_program **p, int64_t **sizes, int64_t tile_out[2],
                        sc_error *err);

/* The error's message into buf (len bytes, NUL-terminated); buf NULL or
 * len 0: nothing. */
void _sc_copy_err(const sc_error *e, char *buf, size_t len);

/* ---- program analysis (op/analysis.c, no torch) -------------------------- */

/* Activations whose derivative ATen computes from the output. */
int _sc_act_uses_output(int act);

/* Instruction 0 is a per-channel affine map of the image read by nothing
 * else (a depthwise 1 x 1 convolution, stride 1, no padding): the image
 * gather may apply it (forward.c). */
int _sc_image_affine_shape(const sc_program *p);

/* Parameter k (-1: none) takes a gradient under mask (as for _sc_needs;
 * NULL: all do). */
int _sc_param_wanted(const int *mask, int64_t k);

/* Whether the backward computes convolution i's weight gradient (and so
 * reads its input): its weight's gradient is wanted, or, with a batch norm
 * folded in (fused from _sc_fusion, or NULL), the norm's weight's, which
 * is a sum against the same product. One decision for the replay
 * (backward.c, fold.c), what it keeps (_sc_keep_set) and the memory model
 * (models.c). */
int _sc_conv_wgrad(const sc_program *p, const int *mask, const int64_t *fused,
                   int64_t i);

/* Batch norms folded into the convolution before them (fuse = 1; the
 * replay does so for float32 / float64): fused[i] = j for a convolution i
 * whose output only batch norm j reads, fused[j] = i, else -1 (n_instr
 * entries). The convolution then runs with the weight w * s and the bias
 * (b - mean) * s + beta, s = gamma / sqrt(var + eps), and the batch norm
 * passes its input on: no intermediate value, nothing kept for it. */
void _sc_fusion(const sc_program *p, int fuse, int64_t *fused);

/* Which values carry a gradient (needs[v]) when the backward is asked for
 * mask[0] the image's and mask[1 + k] params[k]'s gradient (mask NULL:
 * all of them); fused from _sc_fusion, or NULL. */
void _sc_needs(const sc_program *p, const int *mask, const int64_t *fused,
               unsigned char *needs);

/* The values a backward op reads (keep[v] = 1), for the instructions whose
 * output needs a gradient (needs[i + 1]) and the parameter gradients asked
 * for (mask as for _sc_needs): inputs of pools, layer norms and
 * input-based activations, outputs of output-based ones, and the inputs of
 * the ops linear in their input (conv, batch norm with frozen statistics,
 * channel linear / scale) only when their weight's gradient is wanted (a
 * fused convolution's: or its batch norm's weight's): the input's gradient
 * needs no input; fused batch norms keep nothing. The recompute frees everything else
 * (batch-norm and add outputs, ...) as soon as it was consumed. */
void _sc_keep_set(const sc_program *p, const unsigned char *needs,
                  const int *mask, const int64_t *fused, unsigned char *keep);

#ifdef STREAMCNN_TORCH /* ---- everything below talks to libtorch ---------- */

#include "abi.h"

/* Boxing helpers from op/boxing.cpp (C++ new/delete). */
uint64_t _sc_box_some(uint64_t value);
void _sc_box_free(uint64_t boxed);

/* State of one operator call: error, dtype and device of all tensors, and
 * lazily created 0-dim constants. Zero-initialise; release with
 * _sc_ctx_release. */
typedef struct sc_ctx {
  sc_error err;
  int32_t dtype;        /* aoti dtype code of the computation: params and
                           the image (or, for a uint8 image, the params') */
  int kdtype;           /* the same as sc_dtype, for the tile kernels */
  int image_u8;         /* the image is uint8: tiles convert it, no grad */
  int image_host;       /* the image is in host memory, the parameters on
                           a CUDA device: tiles are gathered from the host
                           (read directly when pinned), no image grad */
  int32_t image_dtype;  /* aoti dtype code of the image */
  int32_t device_type;  /* aoti device type code */
  int32_t device_index;
  int is_cuda;
  void *stream;         /* current cudaStream_t when is_cuda */
  int affine_f32;       /* a half computation whose instruction 0 (the
                           image's mean / std) holds float32 constants */
  int tiles_nhwc;       /* run tiles channels-last (float32 on the CPU) */
  AtenTensorHandle k_zero, k_six; /* 0-dim constants, owned, may be NULL */
} sc_ctx;

void _sc_ctx_release(sc_ctx *ctx);

/* Release an owned handle and clear it; NULL is a no-op. */
void _sc_drop(AtenTensorHandle *h);

/* Tensor metadata (borrowed pointers; valid while the handle lives). */
int _sc_meta(sc_ctx *ctx, AtenTensorHandle t, int64_t *dim,
             int64_t **sizes, int64_t **strides);

/* New owned view: t narrowed to rows [r0, r0 + nr) and cols [c0, c0 + nc)
 * of its last two dimensions. */
int _sc_view(sc_ctx *ctx, AtenTensorHandle t, int64_t r0, int64_t nr,
             int64_t c0, int64_t nc, AtenTensorHandle *out);

/* New owned view: N x C x H x W contiguous (sizes) of the 1-D contiguous
 * tensor flat, from element offset on (bounds checked). */
int _sc_flat_view(sc_ctx *ctx, AtenTensorHandle flat, int64_t offset,
                  const int64_t sizes[4], AtenTensorHandle *out);

/* Records "streamcnn: out of memory: could not allocate WHAT (sizes,
 * dtype, MiB, device)" in ctx->err and returns SC_ERR: every failed
 * allocation of the replay says so, with what and how much. */
int _sc_oom(sc_ctx *ctx, const char *what, int64_t ndim, const int64_t *sizes,
            int32_t dtype, int32_t device_type);

/* New owned contiguous tensor of this ctx's dtype and device. */
int _sc_empty(sc_ctx *ctx, int64_t ndim, const int64_t *sizes,
              AtenTensorHandle *out);
/* The same with an explicit aoti dtype; zeroed when zero is set. */
int _sc_empty_as(sc_ctx *ctx, int32_t dtype, int64_t ndim,
                 const int64_t *sizes, int zero, AtenTensorHandle *out);
/* _sc_empty_as naming what it allocates in the out-of-memory error
 * ("the stem output", "the image's gradient": whole-image tensors, named
 * "the ...", get other advice than tile-sized ones, "a tile"). */
int _sc_alloc(sc_ctx *ctx, const char *what, int32_t dtype, int64_t ndim,
              const int64_t *sizes, int zero, AtenTensorHandle *out);
/* Bytes per element of an image or parameter dtype (uint8, float16,
 * bfloat16, float32, float64; 0 for others). */
int _sc_dtype_size(int32_t d);
/* sc_dtype of an aoti dtype code (0 when the kernels lack it). */
int _sc_kdtype(int32_t dtype);
/* Half precision (float16 / bfloat16) computation: parameter gradients
 * are summed over tiles in float32. */
int _sc_is_half(const sc_ctx *ctx);
int _sc_zeros(sc_ctx *ctx, int64_t ndim, const int64_t *sizes,
              AtenTensorHandle *out);
/* New N x C x H x W tile buffer in the tiles' layout (ctx->tiles_nhwc);
 * zeroed when zero is set. */
int _sc_tile_buffer(sc_ctx *ctx, const int64_t *sizes, int zero,
                    AtenTensorHandle *out);

/* dst (+)= src over their common 4-D extent (tensors of <= 4 dims are
 * viewed as 4-D with leading 1s); extents must match. */
int _sc_copy(sc_ctx *ctx, AtenTensorHandle dst, AtenTensorHandle src,
             int accumulate);

/* Padded tile: new dense N x C x dst_h x dst_w tensor (NCHW, or NHWC when
 * channels_last) holding src (an N x C x src_h x src_w tensor, or NULL for
 * all padding) at (off_h, off_w) and pad_value elsewhere. */
int _sc_gather(sc_ctx *ctx, AtenTensorHandle src, int64_t n, int64_t c,
               int64_t dst_h, int64_t dst_w, int64_t off_h, int64_t off_w,
               double pad_value, int channels_last, AtenTensorHandle *out);
/* src (N x C x h x w, any strides, any dtype the gather converts) mapped
 * per channel to src * scale[c] + shift[c] (shift may be NULL) in a new
 * dense tile of the computation's dtype: a depthwise 1 x 1 convolution of
 * the image (mean / std) fused into the gather. */
int _sc_gather_affine(sc_ctx *ctx, AtenTensorHandle src, int64_t n,
                      int64_t c, int channels_last, AtenTensorHandle scale,
                      AtenTensorHandle shift, AtenTensorHandle *out);
/* 4-D with the channel stride 1 (and more than one channel). */
int _sc_is_channels_last(sc_ctx *ctx, AtenTensorHandle t);

/* Owned contiguous copy when t is not contiguous; else t itself (moved). */
int _sc_make_contiguous(sc_ctx *ctx, AtenTensorHandle *t);

/* ---- ATen calls (op/aten.c). Inputs are borrowed, outputs owned. ------- */

/* Count numel(y) x per forward multiply-adds done by our own kernels (the
 * normalisation fused into the image gather), beside ATen's. */
void _sc_count_macs(AtenTensorHandle y, double per);
#ifndef __cplusplus
/* Process-wide counters (sc_macs, sc_backward_tiles): read n of them into
 * out (when given), zeroing them when reset; add v to one, atomically. */
void _sc_counters_read(_Atomic double *c, int n, double *out, int reset);
void _sc_counter_add(_Atomic double *c, double v);
#endif

int _sc_conv(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
             AtenTensorHandle b, const sc_instr *in, AtenTensorHandle *out);
int _sc_conv_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                      AtenTensorHandle w, const sc_instr *in,
                      const int mask[3], AtenTensorHandle res[3]);
int _sc_maxpool(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                AtenTensorHandle *out, AtenTensorHandle *indices);
int _sc_maxpool_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         const sc_instr *in, AtenTensorHandle indices,
                         AtenTensorHandle *out);
/* divisor_override: 0 none, else that constant. */
int _sc_avgpool(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                int64_t divisor_override, AtenTensorHandle *out);
int _sc_avgpool_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         const sc_instr *in, int64_t divisor_override,
                         AtenTensorHandle *out);
/* Average pooling whose divisor varies (at the image's border): window
 * sums divided by the divisor map `div` ([1, 1, h, w], _sc_avg_map_dtype),
 * and its backward. For float16 / bfloat16 both run in float32, rounded
 * once at the end, as ATen divides before its one rounding (a float16
 * window sum overflows at 65504). */
int _sc_avgpool_div(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                    AtenTensorHandle div, AtenTensorHandle *out);
int _sc_avgpool_div_backward(sc_ctx *ctx, AtenTensorHandle g,
                             AtenTensorHandle x, const sc_instr *in,
                             AtenTensorHandle div, AtenTensorHandle *out);
/* The dtype of a divisor map: the compute dtype, float32 for half ones. */
int32_t _sc_avg_map_dtype(const sc_ctx *ctx);
int _sc_batchnorm(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle const *p4,
                  double eps, AtenTensorHandle *out);
/* A frozen batch norm folded into the convolution before it (weight w,
 * bias b or NULL; p4 as for _sc_batchnorm): out[0] the weight w * scale,
 * out[1] the bias b * scale + beta - mean * scale, out[2] scale = gamma *
 * inv, out[3] inv = 1 / sqrt(var + eps) ([C] each). */
int _sc_fold_bn(sc_ctx *ctx, AtenTensorHandle w, AtenTensorHandle b,
                AtenTensorHandle const *p4, double eps,
                AtenTensorHandle out[4]);
/* The gradients of a folded pair from gw, the weight gradient taken
 * against out[0] with the batch norm's output gradient g, and gs, g summed
 * per channel (over a tile: all is linear in g), where want[] asks: res[0] the
 * convolution's weight, [1] its bias, [2] the batch norm's weight, [3] its
 * bias. fold: _sc_fold_bn's out. */
int _sc_fold_bn_grads(sc_ctx *ctx, AtenTensorHandle w, AtenTensorHandle b,
                      AtenTensorHandle const *p4, AtenTensorHandle const *fold,
                      AtenTensorHandle gw, AtenTensorHandle gs,
                      const int want[4], AtenTensorHandle res[4]);
/* g summed over batch and pixels per channel, as [C]. */
int _sc_channel_sum(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle *out);
int _sc_batchnorm_backward(sc_ctx *ctx, AtenTensorHandle g,
                           AtenTensorHandle x, AtenTensorHandle const *p4,
                           double eps, const int mask[3],
                           AtenTensorHandle res[3]);
/* Per-pixel channel ops on N x C x H x W values (w, b may be NULL). */
int _sc_layernorm_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
                    AtenTensorHandle b, double eps, AtenTensorHandle *out);
int _sc_layernorm_c_backward(sc_ctx *ctx, AtenTensorHandle g,
                             AtenTensorHandle x, AtenTensorHandle w,
                             AtenTensorHandle b, double eps, const int mask[3],
                             AtenTensorHandle res[3]);
int _sc_linear_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
                 AtenTensorHandle b, AtenTensorHandle *out);
int _sc_linear_c_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                          AtenTensorHandle w, const int mask[3],
                          AtenTensorHandle res[3]);
/* s: the per-channel scale in its own shape; res[1] comes back in it. */
int _sc_scale_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle s,
                AtenTensorHandle *out);
int _sc_scale_c_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         AtenTensorHandle s, const int mask[2],
                         AtenTensorHandle res[2]);
int _sc_act(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle x,
            AtenTensorHandle *out);
/* x: the activation's input, y: its output. */
int _sc_act_backward(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle g,
                     AtenTensorHandle x, AtenTensorHandle y,
                     AtenTensorHandle *out);
/* In place: x = relu(x); *out is a new reference to x. */
int _sc_relu_(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle *out);
int _sc_relu_into(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle dst);
/* In place: g = y > 0 ? g : 0 (ReLU's threshold_backward without a new
 * tensor; g must be writable). */
int _sc_relu_backward_(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle y);
int _sc_add(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
            AtenTensorHandle *out);
int _sc_div(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
            AtenTensorHandle *out);
/* a /= b in place (a owned by the caller and writable). */
int _sc_div_(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b);
/* dst.copy_(src) across devices (small host-built tensors). */
int _sc_copy_across(sc_ctx *ctx, AtenTensorHandle dst, AtenTensorHandle src);
/* A channels instruction (SC_OP_CHANNELS) between `sel` (its c_out
 * channels) and `whole` (its input's): copies whole's channels into sel
 * (forward) or, to_whole, sel into whole's channels (backward, into a
 * zeroed gradient). Same spatial shape. */
int _sc_channel_map(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle sel,
                    AtenTensorHandle whole, int to_whole);
/* View of channels [c0, c0 + nc) of an N x C x h x w tensor (its strides). */
int _sc_channel_view(sc_ctx *ctx, AtenTensorHandle t, int64_t c0, int64_t nc,
                     AtenTensorHandle *out);
/* Which pixels of g (N x C x h x w, any strides) hold a non-zero (NaN
 * counts) over batch and channels: a new contiguous h x w bool tensor in
 * host memory (copied there from a CUDA device: a synchronisation). */
int _sc_nonzero_map(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle *out);

/* ---- replay (op/replay.c, op/validate.c) -------------------------------- */

/* Inputs of one call, all borrowed; params has p->n_params entries. */
typedef struct sc_call {
  const sc_program *prog;
  AtenTensorHandle image;
  AtenTensorHandle *params;
  int64_t tile[2];       /* input tile edge, rows / cols, halo included */
  int cached;            /* halo caching along rows: every value computed
                            once per column of tiles */
  AtenTensorHandle strips; /* cached backward: the halos its forward saved
                              (borrowed); NULL otherwise */
  /* Tile-parallel streaming (the *_rows ops): only the output rows
   * [rows[0], rows[1]) of an image of rows[3] rows, whose rows
   * [rows[2], rows[2] + image rows) the image tensor holds. banded = 0:
   * the whole output of the whole image (rows unused). */
  int banded;
  int64_t rows[4];
} sc_call;

/* Validate image, params and tile against the program. */
int _sc_validate(sc_ctx *ctx, const sc_call *call);

/* Stem output for the whole image (new tensor, contiguous), computed with
 * halo caching whatever call->cached says. With strips given, *strips is
 * set to a new flat tensor holding the halos a cached backward needs (see
 * _sc_backward). */
int _sc_forward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle *out,
                AtenTensorHandle *strips);

/* Gradients. mask[0] image, mask[1 + k] params[k]. grads[0] / grads[1 + k]
 * are set (owned, contiguous) where mask is true, NULL elsewhere. */
int _sc_backward(sc_ctx *ctx, const sc_call *call, AtenTensorHandle grad_out,
                 const int *mask, AtenTensorHandle *grads);

#ifdef STREAMCNN_REPLAY /* ---- the replay's rooms (see op/README.md) ---- */

/* One replay call's state, shared by run.c, halo.c, hostimage.c,
 * forward.c, fold.c, validate.c, backward.c and replay.c.
 *
 * Ownership: a sc_run owns every handle stored in it (NULL or owned, never
 * borrowed, except `strips`, the caller's); _sc_run_tile_release frees the
 * per-tile state (val, grad, aux), _sc_run_release everything. Who writes
 * what: run_init (replay.c) the per-call fields; fold.c fused, fold and
 * fsum; halo.c the strips' layout (band_off, lstrip_off, strip_total) and
 * the halo arrays; hostimage.c the prefetch fields; forward.c and
 * backward.c the per-tile state. Borrowed inputs (image, params,
 * grad_output) are only read, never written. */
#include "tile.h"

typedef struct sc_run {
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
  int64_t out_row0;         /* first output row computed (call->rows[0] of
                               a band, else 0): the stem output and
                               grad_output tensors start there */
  int64_t img_rows[2];      /* image rows the image tensor holds (absolute,
                               half-open): its gradient covers the same */

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
                               tiles (converted once, _sc_fold_grads_finish) */
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
  int sweep;                 /* _sc_forward_tile fills band_next / lnext */
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
  AtenTensorHandle px_buf;   /* the current tile's copy (owned), or NULL */
  int64_t px_span[2][2];     /* its rows and cols of the image */
  int host_direct;           /* this tile's pixels are read from pinned memory */
  void *host_ev;             /* cudaEvent_t after the last such read, or NULL */

  /* the sparse backward (sparse.c): plans of one box, made on first use */
  sc_axis_plan *box_plan[2];
} sc_run;

/* The per-value handle arrays of halo caching (run_init allocates
 * them, _sc_run_release frees them). */
#define HALO_ARRAYS(r)                                                        \
  {&(r)->band, &(r)->band_next, &(r)->lhalo, &(r)->lnext, &(r)->gband,       \
   &(r)->gband_up, &(r)->gleft}

/* ---- spans of the current tile (r->cur) and small helpers ---- */

/* The span of value v the tile holds (its region: own span and halo). */
static inline const int64_t *region(const sc_run *r, int axis, int64_t v) {
  return &r->cur[axis]->region[2 * v];
}

/* The span instruction i reads through input slot `slot`. */
static inline const int64_t *readspan(const sc_run *r, int axis, int64_t i,
                                      int slot) {
  return &r->cur[axis]->read[4 * i + 2 * slot];
}

/* The span of value v the tile computes (region minus the halo). */
static inline const int64_t *own(const sc_run *r, int axis, int64_t v) {
  return &r->cur[axis]->own[2 * v];
}

static inline int empty(const int64_t *s) { return s[1] <= s[0]; }

static inline int same(const int64_t *a, const int64_t *b) {
  return a[0] == b[0] && a[1] == b[1];
}

static inline int value_empty(const sc_run *r, int64_t v) {
  return empty(region(r, 0, v)) || empty(region(r, 1, v));
}

/* [lo, hi) clipped to [0, n) */
static inline void clip(const int64_t *s, int64_t n, int64_t out[2]) {
  out[0] = s[0] < 0 ? 0 : s[0];
  out[1] = s[1] > n ? n : s[1];
  if (out[1] < out[0]) out[1] = out[0];
}

/* params[k] (borrowed), or NULL for k = -1 (no such parameter). */
static inline AtenTensorHandle param(const sc_run *r, int64_t k) {
  return k >= 0 ? r->call->params[k] : NULL;
}

/* Parameter k (-1: none) takes a gradient in this backward. */
static inline int wants(const sc_run *r, int64_t k) {
  return k >= 0 && r->mask[1 + k];
}

/* run.c */
/* New reference to t restricted to the absolute spans (row, col), given
 * that t covers the absolute spans (trow, tcol). */
int _sc_subview(sc_run *r, AtenTensorHandle t, const int64_t *trow,
                const int64_t *tcol, const int64_t *row, const int64_t *col,
                AtenTensorHandle *out);
/* r->order: the tiles, largest cone first (cone plans). */
int _sc_order_tiles(sc_run *r);
/* Make the k-th tile of r->order current (cone plans). */
void _sc_select_tile(sc_run *r, int64_t k);
/* Cached plans: make row tile t, column tile c the current tile. */
void _sc_select_cached(sc_run *r, int64_t t, int64_t c);
/* Once per CPU call: hand free heap pages back to the OS. */
void _sc_release_free_pages(const sc_ctx *ctx);
void _sc_run_tile_release(sc_run *r);
void _sc_run_release(sc_run *r);
/* Drop n handles (h NULL: nothing); move n handles (dst's released). */
void _sc_drop_all(AtenTensorHandle *h, int64_t n);
void _sc_move_all(AtenTensorHandle *dst, AtenTensorHandle *src, int64_t n);
/* The progress callback (sc_set_progress) of this thread, if any. */
void _sc_report(int phase, int64_t done, int64_t total);
/* Add g (the gradient of the span instruction i reads through slot j)
 * into its input value's gradient (or the image's); mine: g's storage may
 * be adopted. */
int _sc_accum_input(sc_run *r, int64_t i, int j, AtenTensorHandle g,
                    int mine);
/* Add gv (borrowed: value v's gradient over the spans cl, inside v's
 * region) into grad[v]; mine: gv's storage may be adopted. */
int _sc_add_grad(sc_run *r, int64_t v, int64_t cl[2][2], AtenTensorHandle gv,
                 int mine);
/* *sum += *t (owned; adopted when *sum is NULL), *t dropped. */
int _sc_accum_sum(sc_ctx *ctx, AtenTensorHandle *sum, AtenTensorHandle *t);
/* Sum parameter k's gradient (owned t) over tiles and uses. */
int _sc_accum_param(sc_run *r, int64_t k, AtenTensorHandle *t);

/* halo.c */
int _sc_plan_strips(sc_run *r);
int _sc_has_halo(const sc_run *r, int64_t o);
int _sc_halo_buffer(sc_run *r, int64_t o, AtenTensorHandle *buf,
                    AtenTensorHandle *own_part);
int _sc_band_view(sc_run *r, int64_t t, int64_t v, AtenTensorHandle *out);
int _sc_lstrip_view(sc_run *r, int64_t t, int64_t c, int64_t v,
                    AtenTensorHandle *out);
int _sc_add_halo(sc_run *r, int64_t o);
int _sc_save_halo(sc_run *r, int64_t o);
int _sc_pass_pending(sc_run *r, int64_t o);
/* Cached backward: r->band / r->lhalo of the current tile, strip views
 * narrowed to the current plans' regions. */
int _sc_halo_views(sc_run *r);
/* The spans of v a pending gradient covers: left = 0 the band below over
 * our own columns (r->gband[v]), 1 the right one's left strip (gleft). */
void _sc_pending_span(const sc_run *r, int64_t v, int left, int64_t rows[2],
                      int64_t cols[2]);

/* hostimage.c */
int _sc_host_tile(sc_run *r);
int _sc_mark_host_reads(sc_run *r);

/* forward.c */
int _sc_layer_input(sc_run *r, int64_t i, int j, double pad_value,
                    AtenTensorHandle *out);
int _sc_layer_shape(sc_run *r, int64_t i, int j, AtenTensorHandle *out);
int _sc_pointwise_input(sc_run *r, int64_t i, int j, AtenTensorHandle *out);
int _sc_own_view(sc_run *r, AtenTensorHandle t, int64_t v,
                 AtenTensorHandle *out);
int _sc_forward_tile(sc_run *r, int keep);
int _sc_forward_into(sc_run *r, AtenTensorHandle out);

/* fold.c */
/* Decide the fusion (_sc_fusion) and fold each fused pair's weights. */
int _sc_fold_init(sc_run *r);
int _sc_fused_conv_backward(sc_run *r, int64_t i, AtenTensorHandle g);
int _sc_fold_grads_finish(sc_run *r);

/* validate.c */
/* Shape, strides (borrowed: valid while t lives), dtype and device of t;
 * on failure what names t (`what`) goes into the error. */
int _sc_describe(sc_ctx *ctx, AtenTensorHandle t, const char *what,
                 int64_t *dim, int64_t **sz, int64_t **st, int32_t *dtype,
                 int32_t *dt, int32_t *di);
/* dtype and device are those of the computation. */
int _sc_on_compute(const sc_ctx *ctx, int32_t dtype, int32_t dt, int32_t di);

/* backward.c */
int _sc_backward_tile(sc_run *r, AtenTensorHandle grad_out);
void _sc_choose_cut(sc_run *r);

/* sparse.c */
enum {
  SC_SPARSE_OFF = 0,   /* every tile whole */
  SC_SPARSE_SKIP = 1,  /* tiles without a non-zero gradient skipped */
  SC_SPARSE_BOXES = 2, /* and sparse tiles back-propagated in boxes */
};
/* How a tile ran: the index of its counter (3 counts the boxes). */
enum { SC_TILE_WHOLE, SC_TILE_BOXED, SC_TILE_SKIPPED, SC_TILE_RESTRICTED = 4 };
/* The mode STREAMCNN_SPARSE_BACKWARD asks for (unset: SC_SPARSE_BOXES);
 * fails on a value it does not know. */
int _sc_sparse_mode(sc_ctx *ctx, int *mode);
/* The current tile's backward where it is sparse: *how = SC_TILE_SKIPPED
 * (nothing to do), SC_TILE_BOXED (done, in boxes) or SC_TILE_RESTRICTED
 * (done, cached plans restricted to its non-zero gradients), or
 * SC_TILE_WHOLE: the caller runs the tile (_sc_halo_views and
 * _sc_backward_tile) as without sparsity. Cached plans: the tile's pending
 * gradients must be in place; a skipped or boxed tile leaves none for its
 * left neighbour. */
int _sc_sparse_tile(sc_run *r, AtenTensorHandle grad_out, int mode, int *how);

#endif /* STREAMCNN_REPLAY */

#endif /* STREAMCNN_TORCH */

#ifdef __cplusplus
}
#endif

#endif /* STREAMCNN_INTERNAL_H */
