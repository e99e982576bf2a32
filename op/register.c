/*
 * register.c — the operator boundary: schema registration and the boxed
 * kernels of torch.ops.streamcnn.
 *
 *   streamcnn::forward(Tensor image, Tensor[] params, int[] program,
 *                      int[] tile_size) -> Tensor
 *   streamcnn::backward(Tensor grad_output, Tensor image, Tensor[] params,
 *                       int[] program, int[] tile_size,
 *                       bool[] output_mask) -> Tensor[]
 *   forward_rows, backward_rows, forward_cached_rows, backward_cached_rows:
 *     the same with a trailing `int[] rows` (an output row band, take_rows)
 *
 * A boxed kernel owns every handle and list it receives. It unpacks them,
 * runs the replay with status codes, releases everything it owns and only
 * then raises (aoti_torch_check), so nothing leaks on the error path and
 * the Python process lives on.
 */
#define STREAMCNN_TORCH
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- unpacking (each takes ownership of the list and frees it) ---------- */

static int take_ints(sc_ctx *ctx, StableIValue v, const char *what,
                     int64_t **out, size_t *n) {
  StableListHandle l = (StableListHandle)(uintptr_t)v;
  *out = NULL;
  *n = 0;
  size_t len = 0;
  int rc = SC_OK;
  if (torch_list_size(l, &len)) {
    rc = sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
  } else {
    *out = malloc((len ? len : 1) * sizeof **out);
    if (!*out) rc = sc_fail(&ctx->err, "streamcnn: out of memory");
    for (size_t i = 0; !rc && i < len; i++) {
      StableIValue e;
      if (torch_list_get_item(l, i, &e))
        rc = sc_fail(&ctx->err, "streamcnn: cannot read %s", what);
      else
        (*out)[i] = (int64_t)e;
    }
    *n = len;
  }
  torch_delete_list(l);
  if (rc) {
    free(*out);
    *out = NULL;
    *n = 0;
  }
  return rc;
}

static void drop_tensors(AtenTensorHandle *t, size_t n) {
  if (!t) return;
  for (size_t i = 0; i < n; i++) _sc_drop(&t[i]);
  free(t);
}

/* The list's tensor handles are owned by us once received; take them all
 * (even on failure) so that every one is released exactly once. */
static int take_tensors(sc_ctx *ctx, StableIValue v, AtenTensorHandle **out,
                        size_t *n) {
  StableListHandle l = (StableListHandle)(uintptr_t)v;
  size_t len = 0;
  int rc = SC_OK;
  *out = NULL;
  *n = 0;
  if (torch_list_size(l, &len)) {
    torch_delete_list(l); /* cannot reach the elements: nothing else to do */
    return sc_fail(&ctx->err, "streamcnn: cannot read params");
  }
  AtenTensorHandle *t = calloc(len ? len : 1, sizeof *t);
  for (size_t i = 0; i < len; i++) {
    StableIValue e = 0;
    if (torch_list_get_item(l, i, &e)) {
      rc = sc_fail(&ctx->err, "streamcnn: cannot read params");
      continue;
    }
    if (t)
      t[i] = (AtenTensorHandle)(uintptr_t)e;
    else
      aoti_torch_delete_tensor_object((AtenTensorHandle)(uintptr_t)e);
  }
  torch_delete_list(l);
  if (!t) return sc_fail(&ctx->err, "streamcnn: out of memory");
  *out = t;
  *n = len;
  return rc;
}

/* ---- common call state ------------------------------------------------------- */

typedef struct call_args {
  sc_ctx ctx;
  sc_program *prog;
  AtenTensorHandle image;
  AtenTensorHandle *params;
  size_t n_params;
  int64_t *words;
  size_t n_words;
  int64_t *tile;
  size_t n_tile;
  DeviceGuardHandle guard;
  int grad_mode;
} call_args;

static void args_release(call_args *a) {
  if (a->guard) aoti_torch_delete_device_guard(a->guard);
  a->guard = NULL;
  _sc_ctx_release(&a->ctx);
  _sc_drop(&a->image);
  drop_tensors(a->params, a->n_params);
  a->params = NULL;
  free(a->words);
  free(a->tile);
  a->words = a->tile = NULL;
  sc_program_free(a->prog);
  a->prog = NULL;
  aoti_torch_grad_mode_set_enabled(a->grad_mode);
}

/* Unpack (image, params, program, tile) from stack[first..first+3], decode,
 * validate, and enter the image's device. Takes ownership of those slots. */
static int args_prepare(call_args *a, StableIValue *stack, int first,
                        sc_call *call) {
  sc_ctx *ctx = &a->ctx;
  a->grad_mode = aoti_torch_grad_mode_is_enabled();
  aoti_torch_grad_mode_set_enabled(false); /* no autograd inside the replay */
  a->image = (AtenTensorHandle)(uintptr_t)stack[first];
  int rc = take_tensors(ctx, stack[first + 1], &a->params, &a->n_params);
  rc |= take_ints(ctx, stack[first + 2], "program", &a->words, &a->n_words);
  rc |= take_ints(ctx, stack[first + 3], "tile_size", &a->tile, &a->n_tile);
  if (rc) return SC_ERR;
  if (sc_program_decode(a->words, (int64_t)a->n_words, &a->prog, &ctx->err))
    return SC_ERR;
  if ((int64_t)a->n_params != a->prog->n_params)
    return sc_fail(&ctx->err,
                   "streamcnn: the program indexes %lld parameter tensors but "
                   "%zu were given",
                   (long long)a->prog->n_params, a->n_params);
  if (a->n_tile != 1 && a->n_tile != 2)
    return sc_fail(&ctx->err,
                   "streamcnn: tile_size must have 1 or 2 entries (rows, "
                   "cols), got %zu",
                   a->n_tile);
  bool defined = false;
  if (aoti_torch_is_defined(a->image, &defined) || !defined)
    return sc_fail(&ctx->err, "streamcnn: image is an undefined tensor");
  for (size_t k = 0; k < a->n_params; k++)
    if (aoti_torch_is_defined(a->params[k], &defined) || !defined)
      return sc_fail(&ctx->err, "streamcnn: params[%zu] is undefined", k);
  memset(call, 0, sizeof *call);
  call->prog = a->prog;
  call->image = a->image;
  call->params = a->params;
  call->tile[0] = a->tile[0];
  call->tile[1] = a->tile[a->n_tile - 1];
  if (_sc_validate(ctx, call)) return SC_ERR;
  /* Run tiles channels-last on the CPU for float32 (oneDNN, and ATen's
   * pooling, are several times faster on it: 1.2 vs 17 ms for a 64-channel
   * 235^2 max pool) and whenever the image is channels-last. Outputs and
   * gradients handed back stay contiguous NCHW. */
  ctx->tiles_nhwc = !ctx->is_cuda &&
                    (ctx->dtype == aoti_torch_dtype_float32() ||
                     _sc_is_channels_last(ctx, call->image));
  if (ctx->is_cuda) {
    if (aoti_torch_create_device_guard(ctx->device_index, &a->guard))
      return sc_fail(&ctx->err, "streamcnn: cannot select the CUDA device");
#ifdef SC_WITH_CUDA
    if (aoti_torch_get_current_cuda_stream(ctx->device_index, &ctx->stream))
      return sc_fail(&ctx->err, "streamcnn: cannot get the CUDA stream");
#endif
  }
  return SC_OK;
}

/* Tile-parallel streaming: the trailing `int[] rows` of the *_rows ops,
 * [out_lo, out_hi, image_row0, image_height]: only the stem output rows
 * [out_lo, out_hi) of an image of image_height rows, whose rows
 * [image_row0, image_row0 + H) the image tensor (H rows) holds. Takes
 * ownership of the list (v); call must be prepared (args_prepare) unless
 * rc is already set. The range itself is checked against the output in
 * run_init (replay.c), which knows the output's extent. */
static int take_rows(sc_ctx *ctx, StableIValue v, int rc, sc_call *call) {
  int64_t *rows = NULL;
  size_t n = 0;
  rc |= take_ints(ctx, v, "rows", &rows, &n);
  if (!rc && n != 4)
    rc = sc_fail(&ctx->err,
                 "streamcnn: rows must have 4 entries [out_lo, out_hi, "
                 "image_row0, image_height], got %zu",
                 n);
  if (!rc) {
    int64_t dim, *sz, *st;
    rc = _sc_meta(ctx, call->image, &dim, &sz, &st);
    /* no sums of user numbers before they are bounded (no overflow) */
    if (!rc && (rows[3] < 1 || rows[3] > SC_MAX_EXTENT))
      rc = sc_fail(&ctx->err,
                   "streamcnn: image_height = %lld must be in [1, %lld]",
                   (long long)rows[3], (long long)SC_MAX_EXTENT);
    else if (!rc && (rows[2] < 0 || rows[2] > rows[3] || sz[2] > rows[3] - rows[2]))
      rc = sc_fail(&ctx->err,
                   "streamcnn: an image tensor of %lld rows cannot hold rows "
                   "from image_row0 = %lld of an image of image_height = "
                   "%lld rows",
                   (long long)sz[2], (long long)rows[2], (long long)rows[3]);
  }
  if (!rc) {
    call->banded = 1;
    for (int k = 0; k < 4; k++) call->rows[k] = rows[k];
  }
  free(rows);
  return rc;
}

/* Release everything, then raise with the stored message. */
static void fail_call(call_args *a) {
  char msg[sizeof a->ctx.err.msg];
  memcpy(msg, a->ctx.err.msg, sizeof msg);
  if (!a->ctx.err.set) strcpy(msg, "streamcnn: unknown error");
  args_release(a);
  aoti_torch_check(false, "streamcnn", __FILE__, __LINE__, msg);
}

/* ---- kernels ---------------------------------------------------------------- */

/* forward and forward_cached: both carry halos down the rows (every value
 * computed once per column of tiles); forward_cached also returns them all
 * (the strips) for backward_cached. */
static void forward_impl(StableIValue *stack, int save, int banded) {
  call_args a;
  sc_call call;
  AtenTensorHandle out = NULL, strips = NULL;
  memset(&a, 0, sizeof a);
  int rc = args_prepare(&a, stack, 0, &call);
  if (banded) rc = take_rows(&a.ctx, stack[4], rc, &call);
  if (rc || _sc_forward(&a.ctx, &call, &out, save ? &strips : NULL)) {
    fail_call(&a);
    return;
  }
  args_release(&a);
  stack[0] = (StableIValue)(uintptr_t)out;
  if (save) stack[1] = (StableIValue)(uintptr_t)strips;
}

static void kernel_forward(StableIValue *stack, uint64_t num_args,
                           uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  forward_impl(stack, 0, 0);
}

static void kernel_forward_cached(StableIValue *stack, uint64_t num_args,
                                  uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  forward_impl(stack, 1, 0);
}

/* backward (halos recomputed: each tile's whole cone) and backward_cached
 * (halos from the strips of forward_cached, gradients of the halo rows
 * passed up the column): stack = grad_output, [strips], image, params,
 * program, tile_size, output_mask. */
static void backward_impl(StableIValue *stack, int cached, int banded) {
  call_args a;
  sc_call call;
  AtenTensorHandle grad_out = (AtenTensorHandle)(uintptr_t)stack[0];
  AtenTensorHandle strips =
      cached ? (AtenTensorHandle)(uintptr_t)stack[1] : NULL;
  const int first = cached ? 2 : 1;
  AtenTensorHandle *grads = NULL;
  int64_t *mask64 = NULL;
  int *mask = NULL;
  size_t n_mask = 0;
  StableListHandle out = NULL;
  memset(&a, 0, sizeof a);
  int rc = take_ints(&a.ctx, stack[first + 4], "output_mask", &mask64, &n_mask);
  rc |= args_prepare(&a, stack, first, &call);
  if (banded) rc = take_rows(&a.ctx, stack[first + 5], rc, &call);
  call.cached = cached;
  call.strips = strips;
  if (!rc && n_mask != a.n_params + 1)
    rc = sc_fail(&a.ctx.err,
                 "streamcnn: output_mask has %zu entries, expected %zu (image "
                 "+ one per parameter tensor)",
                 n_mask, a.n_params + 1);
  if (!rc) {
    grads = calloc(a.n_params + 1, sizeof *grads);
    mask = calloc(a.n_params + 1, sizeof *mask);
    if (!grads || !mask) rc = sc_fail(&a.ctx.err, "streamcnn: out of memory");
  }
  if (!rc) {
    for (size_t k = 0; k <= a.n_params; k++) mask[k] = mask64[k] != 0;
    rc = _sc_backward(&a.ctx, &call, grad_out, mask, grads);
  }
  if (!rc) { /* Tensor[]: the requested gradients in order */
    if (torch_new_list_reserve_size(a.n_params + 1, &out))
      rc = sc_fail(&a.ctx.err, "streamcnn: out of memory");
    for (size_t k = 0; !rc && k <= a.n_params; k++) {
      if (!mask[k]) continue;
      if (torch_list_push_back(out, (StableIValue)(uintptr_t)grads[k]))
        rc = sc_fail(&a.ctx.err, "streamcnn: out of memory");
      else
        grads[k] = NULL; /* now owned by the list */
    }
  }
  if (grads)
    for (size_t k = 0; k <= a.n_params; k++) _sc_drop(&grads[k]);
  free(grads);
  free(mask);
  free(mask64);
  _sc_drop(&grad_out);
  _sc_drop(&strips);
  if (rc) {
    if (out) { /* release the handles already moved into the list */
      size_t n = 0;
      torch_list_size(out, &n);
      for (size_t i = 0; i < n; i++) {
        StableIValue e = 0;
        if (!torch_list_get_item(out, i, &e))
          aoti_torch_delete_tensor_object((AtenTensorHandle)(uintptr_t)e);
      }
      torch_delete_list(out);
    }
    fail_call(&a);
    return;
  }
  args_release(&a);
  stack[0] = (StableIValue)(uintptr_t)out;
}

static void kernel_backward(StableIValue *stack, uint64_t num_args,
                            uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  backward_impl(stack, 0, 0);
}

static void kernel_backward_cached(StableIValue *stack, uint64_t num_args,
                                   uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  backward_impl(stack, 1, 0);
}

/* The *_rows ops (tile-parallel streaming): an output row band. */
static void kernel_forward_rows(StableIValue *stack, uint64_t num_args,
                                uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  forward_impl(stack, 0, 1);
}

static void kernel_forward_cached_rows(StableIValue *stack, uint64_t num_args,
                                       uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  forward_impl(stack, 1, 1);
}

static void kernel_backward_rows(StableIValue *stack, uint64_t num_args,
                                 uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  backward_impl(stack, 0, 1);
}

static void kernel_backward_cached_rows(StableIValue *stack,
                                        uint64_t num_args,
                                        uint64_t num_outputs) {
  (void)num_args;
  (void)num_outputs;
  backward_impl(stack, 1, 1);
}

/* ---- registration ------------------------------------------------------------ */

/* Kept for the life of the process: deleting them would unregister the ops,
 * and at exit libtorch's dispatcher may already be gone. */
static TorchLibraryHandle g_def, g_impl;

__attribute__((constructor)) static void sc_register(void) {
  static const char *schemas[] = {
      "forward(Tensor image, Tensor[] params, int[] program, int[] tile_size) "
      "-> Tensor",
      "backward(Tensor grad_output, Tensor image, Tensor[] params, int[] "
      "program, int[] tile_size, bool[] output_mask) -> Tensor[]",
      "forward_cached(Tensor image, Tensor[] params, int[] program, int[] "
      "tile_size) -> (Tensor, Tensor)",
      "backward_cached(Tensor grad_output, Tensor strips, Tensor image, "
      "Tensor[] params, int[] program, int[] tile_size, bool[] output_mask) "
      "-> Tensor[]",
      /* tile-parallel: the same for an output row band (take_rows) */
      "forward_rows(Tensor image, Tensor[] params, int[] program, int[] "
      "tile_size, int[] rows) -> Tensor",
      "backward_rows(Tensor grad_output, Tensor image, Tensor[] params, "
      "int[] program, int[] tile_size, bool[] output_mask, int[] rows) -> "
      "Tensor[]",
      "forward_cached_rows(Tensor image, Tensor[] params, int[] program, "
      "int[] tile_size, int[] rows) -> (Tensor, Tensor)",
      "backward_cached_rows(Tensor grad_output, Tensor strips, Tensor image, "
      "Tensor[] params, int[] program, int[] tile_size, bool[] output_mask, "
      "int[] rows) -> Tensor[]"};
  int ok = !aoti_torch_library_init_def("streamcnn", __FILE__, __LINE__,
                                        &g_def);
  for (size_t i = 0; ok && i < sizeof schemas / sizeof *schemas; i++)
    ok = !aoti_torch_library_def(g_def, schemas[i]);
  ok = ok && !aoti_torch_library_init_impl("streamcnn",
                                           "CompositeExplicitAutograd",
                                           __FILE__, __LINE__, &g_impl);
  ok = ok && !torch_library_impl(g_impl, "forward", kernel_forward,
                                 SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "backward", kernel_backward,
                                 SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "forward_cached",
                                 kernel_forward_cached, SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "backward_cached",
                                 kernel_backward_cached,
                                 SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "forward_rows", kernel_forward_rows,
                                 SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "backward_rows",
                                 kernel_backward_rows, SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "forward_cached_rows",
                                 kernel_forward_cached_rows,
                                 SC_TORCH_BUILD_VERSION);
  ok = ok && !torch_library_impl(g_impl, "backward_cached_rows",
                                 kernel_backward_cached_rows,
                                 SC_TORCH_BUILD_VERSION);
  if (!ok)
    fprintf(stderr, "streamcnn: registering torch.ops.streamcnn failed (is "
                    "another copy of the library already loaded?)\n");
}
