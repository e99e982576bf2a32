/*
 * aten.c — the ATen operators the replay calls, through the stable C shim.
 *
 * Arguments are boxed onto a StableIValue stack and passed to
 * torch_call_dispatcher, which consumes them (tensor handles, lists,
 * strings, optional boxes). Scalars cannot cross the dispatcher in torch
 * 2.10/2.11, so every call below uses a Scalar-free overload, a 0-dim
 * tensor constant, or a c_shim_aten entry point (subtract, full).
 *
 * All functions borrow their tensor inputs and return owned outputs; on
 * failure they return SC_ERR with a message in ctx->err and own nothing.
 */
#define STREAMCNN_TORCH
#include "internal.h"
#include "tile.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ---- stack builder ------------------------------------------------------- */

enum slot_kind {
  SK_PLAIN,      /* int, bool, double, None */
  SK_TENSOR,     /* owned handle */
  SK_LIST,       /* list of plain values */
  SK_BOX_TENSOR, /* optional tensor with a value */
  SK_BOX_LIST,   /* optional list with a value */
  SK_BOX_PLAIN,  /* optional plain value */
  SK_STRING
};

#define STK_MAX 12

typedef struct stk {
  StableIValue v[STK_MAX];
  unsigned char kind[STK_MAX];
  int n;
  int failed; /* a push failed: the call is not made, slots are released */
} stk;

static void slot_push(stk *s, StableIValue v, int kind) {
  if (s->n >= STK_MAX) { /* programming error; never reached by user input */
    s->failed = 1;
    return;
  }
  s->v[s->n] = v;
  s->kind[s->n] = (unsigned char)kind;
  s->n++;
}

static StableIValue from_ptr(const void *p) {
  return (StableIValue)(uintptr_t)p;
}

static void push_plain(stk *s, StableIValue v) { slot_push(s, v, SK_PLAIN); }
static void push_int(stk *s, int64_t v) { push_plain(s, (StableIValue)v); }
static void push_bool(stk *s, int v) { push_plain(s, v ? 1 : 0); }
static void push_double(stk *s, double d) {
  StableIValue v = 0;
  memcpy(&v, &d, sizeof d);
  push_plain(s, v);
}
static void push_none(stk *s) { push_plain(s, 0); }

static AtenTensorHandle new_ref(stk *s, AtenTensorHandle t) {
  AtenTensorHandle h = NULL;
  if (!t || aoti_torch_new_tensor_handle(t, &h) != SC_TORCH_SUCCESS) {
    s->failed = 1;
    return NULL;
  }
  return h;
}

static void push_tensor(stk *s, AtenTensorHandle t) {
  AtenTensorHandle h = new_ref(s, t);
  if (h) slot_push(s, from_ptr(h), SK_TENSOR);
}

static void push_box(stk *s, StableIValue inner, int kind) {
  uint64_t box = _sc_box_some(inner);
  if (!box) {
    s->failed = 1;
    if (kind == SK_BOX_TENSOR)
      aoti_torch_delete_tensor_object((AtenTensorHandle)(uintptr_t)inner);
    else if (kind == SK_BOX_LIST)
      torch_delete_list((StableListHandle)(uintptr_t)inner);
    return;
  }
  slot_push(s, box, kind);
}

/* Tensor? : None when t is NULL. */
static void push_opt_tensor(stk *s, AtenTensorHandle t) {
  if (!t) {
    push_none(s);
    return;
  }
  AtenTensorHandle h = new_ref(s, t);
  if (h) push_box(s, from_ptr(h), SK_BOX_TENSOR);
}

static StableListHandle make_list(stk *s, const int64_t *v, int n) {
  StableListHandle l = NULL;
  if (torch_new_list_reserve_size((size_t)n, &l) != SC_TORCH_SUCCESS) {
    s->failed = 1;
    return NULL;
  }
  for (int i = 0; i < n; i++)
    if (torch_list_push_back(l, (StableIValue)v[i]) != SC_TORCH_SUCCESS) {
      torch_delete_list(l);
      s->failed = 1;
      return NULL;
    }
  return l;
}

/* int[] and bool[] (bools as 0/1). */
static void push_ints(stk *s, const int64_t *v, int n) {
  StableListHandle l = make_list(s, v, n);
  if (l) slot_push(s, from_ptr(l), SK_LIST);
}

static void push_opt_ints(stk *s, const int64_t *v, int n) {
  StableListHandle l = make_list(s, v, n);
  if (l) push_box(s, from_ptr(l), SK_BOX_LIST);
}

static void push_opt_int(stk *s, int has, int64_t v) {
  if (!has)
    push_none(s);
  else
    push_box(s, (StableIValue)v, SK_BOX_PLAIN);
}

static void push_string(stk *s, const char *str) {
  StringHandle h = NULL;
  if (torch_new_string_handle(str, strlen(str), &h) != SC_TORCH_SUCCESS) {
    s->failed = 1;
    return;
  }
  slot_push(s, from_ptr(h), SK_STRING);
}

static void stk_release(stk *s) {
  for (int i = 0; i < s->n; i++) {
    StableIValue v = s->v[i];
    switch (s->kind[i]) {
    case SK_TENSOR:
      aoti_torch_delete_tensor_object((AtenTensorHandle)(uintptr_t)v);
      break;
    case SK_LIST:
      torch_delete_list((StableListHandle)(uintptr_t)v);
      break;
    case SK_BOX_TENSOR:
      aoti_torch_delete_tensor_object(
          (AtenTensorHandle)(uintptr_t) * (uint64_t *)(uintptr_t)v);
      _sc_box_free(v);
      break;
    case SK_BOX_LIST:
      torch_delete_list((StableListHandle)(uintptr_t) * (uint64_t *)(uintptr_t)v);
      _sc_box_free(v);
      break;
    case SK_BOX_PLAIN:
      _sc_box_free(v);
      break;
    case SK_STRING:
      torch_delete_string((StringHandle)(uintptr_t)v);
      break;
    default:
      break;
    }
  }
  s->n = 0;
}

/* Call op.overload with the built stack; the first nret results (tensors)
 * go to out[]. The stack is consumed in every case. */
static int stk_call(sc_ctx *ctx, stk *s, const char *op, const char *overload,
                    int nret, AtenTensorHandle *out) {
  for (int i = 0; i < nret; i++) out[i] = NULL;
  if (s->failed) {
    stk_release(s);
    return sc_fail(&ctx->err,
                   "streamcnn: could not box the arguments of %s (out of "
                   "memory?)",
                   op);
  }
  if (torch_call_dispatcher(op, overload, s->v, SC_TORCH_BUILD_VERSION) !=
      SC_TORCH_SUCCESS)
    return sc_fail(&ctx->err,
                   "streamcnn: %s%s%s failed inside PyTorch (its message is "
                   "printed above)",
                   op, overload[0] ? "." : "", overload);
  for (int i = 0; i < nret; i++) out[i] = (AtenTensorHandle)(uintptr_t)s->v[i];
  return SC_OK;
}

static void drop_n(AtenTensorHandle *t, int n) {
  for (int i = 0; i < n; i++) _sc_drop(&t[i]);
}

/* ---- tensors -------------------------------------------------------------- */

void _sc_drop(AtenTensorHandle *h) {
  if (h && *h) {
    aoti_torch_delete_tensor_object(*h);
    *h = NULL;
  }
}

void _sc_ctx_release(sc_ctx *ctx) {
  _sc_drop(&ctx->k_zero);
  _sc_drop(&ctx->k_six);
}

int _sc_meta(sc_ctx *ctx, AtenTensorHandle t, int64_t *dim, int64_t **sizes,
             int64_t **strides) {
  if (aoti_torch_get_dim(t, dim) || aoti_torch_get_sizes(t, sizes) ||
      aoti_torch_get_strides(t, strides))
    return sc_fail(&ctx->err, "streamcnn: cannot read tensor metadata");
  return SC_OK;
}

int _sc_view(sc_ctx *ctx, AtenTensorHandle t, int64_t r0, int64_t nr,
             int64_t c0, int64_t nc, AtenTensorHandle *out) {
  int64_t dim, *sz, *st, offset = 0, sizes[8];
  *out = NULL;
  if (_sc_meta(ctx, t, &dim, &sz, &st)) return SC_ERR;
  /* _reinterpret_tensor does not check bounds: this is the check */
  if (dim < 2 || dim > 8 || r0 < 0 || nr < 0 || c0 < 0 || nc < 0 ||
      r0 + nr > sz[dim - 2] || c0 + nc > sz[dim - 1])
    return sc_fail(&ctx->err,
                   "streamcnn: internal error: view [%lld +%lld, %lld +%lld] "
                   "outside a tensor of %lld x %lld",
                   (long long)r0, (long long)nr, (long long)c0, (long long)nc,
                   (long long)(dim >= 2 ? sz[dim - 2] : -1),
                   (long long)(dim >= 1 ? sz[dim - 1] : -1));
  for (int64_t i = 0; i < dim; i++) sizes[i] = sz[i];
  sizes[dim - 2] = nr;
  sizes[dim - 1] = nc;
  /* NB: the offset is an increment over t's own storage offset (ATen's
   * _reinterpret_tensor); an empty view starts anywhere, keep it inside */
  if (nr > 0 && nc > 0) offset = r0 * st[dim - 2] + c0 * st[dim - 1];
  if (aoti_torch__reinterpret_tensor(t, dim, sizes, st, offset, out))
    return sc_fail(&ctx->err, "streamcnn: could not make a tensor view");
  return SC_OK;
}

/* The view of channels c0, c0 + step, ..., nc of them, of a 4-d tensor. */
static int channel_slice(sc_ctx *ctx, AtenTensorHandle t, int64_t c0,
                         int64_t nc, int64_t step, AtenTensorHandle *out) {
  int64_t dim, *sz, *st, sizes[4], strides[4];
  *out = NULL;
  if (_sc_meta(ctx, t, &dim, &sz, &st)) return SC_ERR;
  if (nc == 1) step = 1;
  if (dim != 4 || c0 < 0 || nc < 1 || step < 1 || c0 + (nc - 1) * step >= sz[1])
    return sc_fail(&ctx->err,
                   "streamcnn: internal error: channels [%lld +%lld step "
                   "%lld) of a tensor of %lld",
                   (long long)c0, (long long)nc, (long long)step,
                   (long long)(dim == 4 ? sz[1] : -1));
  for (int i = 0; i < 4; i++) sizes[i] = sz[i], strides[i] = st[i];
  sizes[1] = nc;
  strides[1] = st[1] * step;
  /* an empty view starts anywhere (see _sc_view): keep it inside */
  const int64_t offset = sz[0] && sz[2] && sz[3] ? c0 * st[1] : 0;
  if (aoti_torch__reinterpret_tensor(t, 4, sizes, strides, offset, out))
    return sc_fail(&ctx->err, "streamcnn: could not make a tensor view");
  return SC_OK;
}

int _sc_channel_view(sc_ctx *ctx, AtenTensorHandle t, int64_t c0, int64_t nc,
                     AtenTensorHandle *out) {
  return channel_slice(ctx, t, c0, nc, 1, out);
}

int _sc_channel_map(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle sel,
                    AtenTensorHandle whole, int to_whole) {
  /* output channel q * g + r <- input channel start + r * a + q * b: as g
   * copies of Q strided channels (one per r), or Q copies of g (one per
   * q), whichever is fewer */
  const int64_t g = in->groups, q_n = in->c_out / g;
  const int by_r = g <= q_n;
  const int64_t n = by_r ? g : q_n, count = by_r ? q_n : g;
  int rc = SC_OK;
  for (int64_t k = 0; k < n && !rc; k++) {
    AtenTensorHandle s = NULL, w = NULL;
    rc = channel_slice(ctx, sel, by_r ? k : k * g, count, by_r ? g : 1, &s) ||
         channel_slice(ctx, whole,
                       in->ch_start + k * (by_r ? in->ch_a : in->ch_b), count,
                       by_r ? in->ch_b : in->ch_a, &w) ||
         (to_whole ? _sc_copy(ctx, w, s, 0) : _sc_copy(ctx, s, w, 0));
    _sc_drop(&s);
    _sc_drop(&w);
  }
  return rc;
}

int _sc_flat_view(sc_ctx *ctx, AtenTensorHandle flat, int64_t offset,
                  const int64_t sizes[4], AtenTensorHandle *out) {
  int64_t dim, *sz, *st;
  *out = NULL;
  if (_sc_meta(ctx, flat, &dim, &sz, &st)) return SC_ERR;
  const int64_t n = sizes[0] * sizes[1] * sizes[2] * sizes[3];
  const int64_t strides[4] = {sizes[1] * sizes[2] * sizes[3],
                              sizes[2] * sizes[3], sizes[3], 1};
  if (dim != 1 || st[0] != 1 || offset < 0 || offset + n > sz[0])
    return sc_fail(&ctx->err,
                   "streamcnn: internal error: %lld elements at %lld outside "
                   "a flat store of %lld",
                   (long long)n, (long long)offset,
                   (long long)(dim == 1 ? sz[0] : -1));
  if (aoti_torch__reinterpret_tensor(flat, 4, sizes, strides, offset, out))
    return sc_fail(&ctx->err, "streamcnn: could not make a tensor view");
  return SC_OK;
}

int _sc_empty(sc_ctx *ctx, int64_t ndim, const int64_t *sizes,
              AtenTensorHandle *out) {
  return _sc_empty_as(ctx, ctx->dtype, ndim, sizes, 0, out);
}

/* Bytes per element of an image or parameter dtype (uint8, float16,
 * bfloat16, float32, float64; 0 for others). */
int _sc_dtype_size(int32_t d) {
  if (d == aoti_torch_dtype_uint8()) return 1;
  if (d == aoti_torch_dtype_float16() || d == aoti_torch_dtype_bfloat16())
    return 2;
  if (d == aoti_torch_dtype_float32()) return 4;
  if (d == aoti_torch_dtype_float64()) return 8;
  return 0;
}

int _sc_kdtype(int32_t dtype) {
  if (dtype == aoti_torch_dtype_float32()) return SC_DTYPE_F32;
  if (dtype == aoti_torch_dtype_float64()) return SC_DTYPE_F64;
  if (dtype == aoti_torch_dtype_float16()) return SC_DTYPE_F16;
  if (dtype == aoti_torch_dtype_bfloat16()) return SC_DTYPE_BF16;
  if (dtype == aoti_torch_dtype_uint8()) return SC_DTYPE_U8;
  return 0;
}

int _sc_is_half(const sc_ctx *ctx) {
  return ctx->kdtype == SC_DTYPE_F16 || ctx->kdtype == SC_DTYPE_BF16;
}

int _sc_oom(sc_ctx *ctx, const char *what, int64_t ndim, const int64_t *sizes,
            int32_t dtype, int32_t device_type) {
  char shape[160] = "";
  size_t used = 0;
  double bytes = _sc_dtype_size(dtype);
  for (int64_t i = 0; i < ndim && i < 8; i++) {
    bytes *= (double)sizes[i];
    int n = snprintf(shape + used, sizeof shape - used, "%s%lld", i ? "x" : "",
                     (long long)sizes[i]);
    if (n < 0 || (size_t)n >= sizeof shape - used) break;
    used += (size_t)n;
  }
  char device[32] = "cpu";
  if (device_type == aoti_torch_device_type_cuda())
    snprintf(device, sizeof device, "cuda:%d", (int)ctx->device_index);
  /* the stem output and the image's gradient are whole-image tensors:
   * their size is the image's, whatever the tiles */
  const int whole = strncmp(what, "the ", 4) == 0;
  return sc_fail(&ctx->err,
                 "streamcnn: out of memory: could not allocate %s (%s, %d-byte "
                 "elements, %.1f MiB) on %s; %s",
                 what, shape, _sc_dtype_size(dtype), bytes / 1048576.0, device,
                 whole ? "it is a whole-image tensor, which no tile_size or "
                         "memory_budget makes smaller: a smaller image or batch "
                         "is needed"
                       : "a smaller tile_size or a memory_budget lowers the "
                         "peak");
}

int _sc_empty_as(sc_ctx *ctx, int32_t dtype, int64_t ndim,
                 const int64_t *sizes, int zero, AtenTensorHandle *out) {
  return _sc_alloc(ctx, "a tensor", dtype, ndim, sizes, zero, out);
}

/* Bytes of this machine's physical memory, or 0 when unknown. */
static double physical_bytes(void) {
  const long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && size > 0 ? (double)pages * (double)size : 0.0;
}

int _sc_alloc(sc_ctx *ctx, const char *what, int32_t dtype, int64_t ndim,
              const int64_t *sizes, int zero, AtenTensorHandle *out) {
  int64_t strides[8];
  *out = NULL;
  if (ndim < 0 || ndim > 8)
    return sc_fail(&ctx->err, "streamcnn: internal error: rank %lld",
                   (long long)ndim);
  if (!ctx->is_cuda) {
    /* more than the machine has: said without asking the allocator, whose
     * failure torch's shim also prints with a C++ backtrace */
    double bytes = _sc_dtype_size(dtype);
    for (int64_t i = 0; i < ndim; i++) bytes *= (double)sizes[i];
    const double ram = physical_bytes();
    if (ram > 0 && bytes > ram)
      return _sc_oom(ctx, what, ndim, sizes, dtype, ctx->device_type);
  }
  int64_t acc = 1;
  for (int64_t i = ndim - 1; i >= 0; i--) {
    strides[i] = acc;
    acc *= sizes[i] > 1 ? sizes[i] : 1;
  }
  if (aoti_torch_empty_strided(ndim, sizes, strides, dtype,
                               ctx->device_type, ctx->device_index, out))
    return _sc_oom(ctx, what, ndim, sizes, dtype, ctx->device_type);
  if (zero && aoti_torch_zero_(*out)) {
    _sc_drop(out);
    return sc_fail(&ctx->err, "streamcnn: zero_ failed");
  }
  return SC_OK;
}

int _sc_zeros(sc_ctx *ctx, int64_t ndim, const int64_t *sizes,
              AtenTensorHandle *out) {
  if (_sc_empty(ctx, ndim, sizes, out)) return SC_ERR;
  if (aoti_torch_zero_(*out)) {
    _sc_drop(out);
    return sc_fail(&ctx->err, "streamcnn: zero_ failed");
  }
  return SC_OK;
}

int _sc_tile_buffer(sc_ctx *ctx, const int64_t *sizes, int zero,
                    AtenTensorHandle *out) {
  if (!ctx->tiles_nhwc)
    return zero ? _sc_zeros(ctx, 4, sizes, out) : _sc_empty(ctx, 4, sizes, out);
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  const int64_t nhwc[4] = {h * w * c, 1, w * c, c};
  *out = NULL;
  if (aoti_torch_empty_strided(4, sizes, nhwc, ctx->dtype, ctx->device_type,
                               ctx->device_index, out))
    return _sc_oom(ctx, "a tile buffer", 4, sizes, ctx->dtype, ctx->device_type);
  if (zero && aoti_torch_zero_(*out)) {
    _sc_drop(out);
    return sc_fail(&ctx->err, "streamcnn: zero_ failed");
  }
  return SC_OK;
}

/* ---- constants ------------------------------------------------------------ */

static int scalar_tensor(sc_ctx *ctx, double value, AtenTensorHandle *out) {
  int32_t dtype = ctx->dtype, dev = ctx->device_type;
  if (aoti_torch_aten_full(NULL, 0, value, &dtype, NULL, &dev,
                           ctx->device_index, NULL, out))
    return sc_fail(&ctx->err, "streamcnn: could not create a constant");
  return SC_OK;
}

static int const_zero(sc_ctx *ctx, AtenTensorHandle *out) {
  if (!ctx->k_zero && scalar_tensor(ctx, 0.0, &ctx->k_zero)) return SC_ERR;
  *out = ctx->k_zero; /* borrowed */
  return SC_OK;
}

static int const_six(sc_ctx *ctx, AtenTensorHandle *out) {
  if (!ctx->k_six && scalar_tensor(ctx, 6.0, &ctx->k_six)) return SC_ERR;
  *out = ctx->k_six; /* borrowed */
  return SC_OK;
}

/* ---- generic small calls --------------------------------------------------- */

static int call1(sc_ctx *ctx, const char *op, const char *ov,
                 AtenTensorHandle a, AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, a);
  return stk_call(ctx, &s, op, ov, 1, out);
}

static int call2(sc_ctx *ctx, const char *op, const char *ov,
                 AtenTensorHandle a, AtenTensorHandle b,
                 AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, a);
  push_tensor(&s, b);
  return stk_call(ctx, &s, op, ov, 1, out);
}

static int call3(sc_ctx *ctx, const char *op, const char *ov,
                 AtenTensorHandle a, AtenTensorHandle b, AtenTensorHandle c,
                 AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, a);
  push_tensor(&s, b);
  push_tensor(&s, c);
  return stk_call(ctx, &s, op, ov, 1, out);
}

int _sc_add(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
            AtenTensorHandle *out) {
  /* a - (-1) * b: the Scalar-taking subtract of c_shim_aten; 1 * b == b, so
   * this is exactly a + b. */
  *out = NULL;
  if (aoti_torch_aten_subtract_Tensor(a, b, -1.0, out))
    return sc_fail(&ctx->err, "streamcnn: aten::sub failed inside PyTorch");
  return SC_OK;
}

int _sc_div(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
            AtenTensorHandle *out) {
  return call2(ctx, "aten::div", "Tensor", a, b, out);
}

int _sc_div_(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b) {
  AtenTensorHandle r = NULL;
  if (call2(ctx, "aten::div_", "Tensor", a, b, &r)) return SC_ERR;
  _sc_drop(&r);
  return SC_OK;
}

int _sc_copy_across(sc_ctx *ctx, AtenTensorHandle dst, AtenTensorHandle src) {
  AtenTensorHandle r = NULL;
  stk s = {0};
  push_tensor(&s, dst);
  push_tensor(&s, src);
  push_bool(&s, 0);
  int rc = stk_call(ctx, &s, "aten::copy_", "", 1, &r);
  _sc_drop(&r);
  return rc;
}

/* ---- layers ---------------------------------------------------------------- */

static const int64_t zeros2[2] = {0, 0};

/* Window arguments shared by each layer's forward and backward. Padding is
 * always 0: the replay pads explicitly, and only at the true border. */

/* stride, padding, dilation, transposed, output_padding, groups */
static void push_conv_window(stk *s, const sc_instr *in) {
  const int64_t st[2] = {in->win[0].s, in->win[1].s};
  const int64_t d[2] = {in->win[0].d, in->win[1].d};
  push_ints(s, st, 2);
  push_ints(s, zeros2, 2);
  push_ints(s, d, 2);
  push_bool(s, 0);
  push_ints(s, zeros2, 2);
  push_int(s, in->groups);
}

/* kernel_size, stride, padding, dilation, ceil_mode (the tile's span is
 * exact, floor suffices) */
static void push_maxpool_window(stk *s, const sc_instr *in) {
  const int64_t k[2] = {in->win[0].k, in->win[1].k};
  const int64_t st[2] = {in->win[0].s, in->win[1].s};
  const int64_t d[2] = {in->win[0].d, in->win[1].d};
  push_ints(s, k, 2);
  push_ints(s, st, 2);
  push_ints(s, zeros2, 2); /* NB: -inf padding, applied explicitly */
  push_ints(s, d, 2);
  push_bool(s, 0);
}

/* kernel_size, stride, padding, ceil_mode, count_include_pad,
 * divisor_override: with zero explicit padding, count_include_pad=True
 * divides by kh * kw (or the override); the replay fixes border divisors */
static void push_avgpool_window(stk *s, const sc_instr *in, int64_t divisor) {
  const int64_t k[2] = {in->win[0].k, in->win[1].k};
  const int64_t st[2] = {in->win[0].s, in->win[1].s};
  push_ints(s, k, 2);
  push_ints(s, st, 2);
  push_ints(s, zeros2, 2);
  push_bool(s, 0);
  push_bool(s, 1);
  push_opt_int(s, divisor != 0, divisor);
}

/* ---- multiply-add counter (sc_macs) ------------------------------------- */

/* Process-wide: a CUDA backward runs on autograd's device thread, not on
 * the thread that called the forward. */
static _Atomic double g_macs[3];

void _sc_counters_read(_Atomic double *c, int n, double *out, int reset) {
  for (int k = 0; k < n; k++) {
    const double v = reset ? atomic_exchange(&c[k], 0.0) : atomic_load(&c[k]);
    if (out) out[k] = v;
  }
}

void _sc_counter_add(_Atomic double *c, double v) {
  double cur = atomic_load(c);
  while (!atomic_compare_exchange_weak(c, &cur, cur + v)) {
  }
}

void sc_macs(double out[3], int reset) {
  _sc_counters_read(g_macs, 3, out, reset);
}

/* Count numel(y) x per multiply-adds under kind k (y: an output-shaped
 * tensor of the layer). */
static void count_macs(int k, AtenTensorHandle y, double per) {
  int64_t dim, *sz;
  if (!y || aoti_torch_get_dim(y, &dim) || aoti_torch_get_sizes(y, &sz))
    return;
  double n = 1.0;
  for (int64_t d = 0; d < dim; d++) n *= (double)sz[d];
  _sc_counter_add(&g_macs[k], n * per);
}

void _sc_count_macs(AtenTensorHandle y, double per) { count_macs(0, y, per); }

static double conv_macs_per_output(const sc_instr *in) {
  return (double)(in->c_in / in->groups) * (double)in->win[0].k *
         (double)in->win[1].k;
}

/* oneDNN 3.10 (torch 2.11's CPU convolutions) computes a bfloat16
 * convolution whose output is one column wide, with a column stride over 1,
 * wrongly (garbage, NaN, varying from run to run) once that column is 5 or
 * more rows high; narrow tiles make such convolutions. With one output
 * column the column stride is immaterial: for such a convolution *xs is
 * set to the view of x's columns its window reads and *stride1 to `in`
 * with column stride 1 (the same sums;
 * test_amp.py::test_bfloat16_one_column_tiles); else *xs stays NULL. */
static int bf16_one_column(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                           AtenTensorHandle *xs, sc_instr *stride1) {
  int64_t dim, *sz, *st;
  const sc_window *w = &in->win[1];
  const int64_t span = w->d * (w->k - 1) + 1;
  *xs = NULL;
  if (ctx->is_cuda || ctx->kdtype != SC_DTYPE_BF16 || w->s == 1) return SC_OK;
  if (_sc_meta(ctx, x, &dim, &sz, &st)) return SC_ERR;
  if (dim != 4 || sz[3] < span || (sz[3] - span) / w->s != 0) return SC_OK;
  *stride1 = *in;
  stride1->win[1].s = 1;
  return _sc_view(ctx, x, 0, sz[2], 0, span, xs);
}

int _sc_conv(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
             AtenTensorHandle b, const sc_instr *in, AtenTensorHandle *out) {
  AtenTensorHandle xs;
  sc_instr stride1;
  *out = NULL;
  if (bf16_one_column(ctx, x, in, &xs, &stride1)) return SC_ERR;
  if (xs) in = &stride1;
  stk s = {0};
  push_tensor(&s, xs ? xs : x);
  push_tensor(&s, w);
  push_opt_tensor(&s, b);
  push_conv_window(&s, in);
  const int rc = stk_call(ctx, &s, "aten::convolution", "", 1, out);
  _sc_drop(&xs);
  if (rc) return SC_ERR;
  count_macs(0, *out, conv_macs_per_output(in));
  return SC_OK;
}

int _sc_conv_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                      AtenTensorHandle w, const sc_instr *in,
                      const int mask[3], AtenTensorHandle res[3]) {
  const int64_t m[3] = {!!mask[0], !!mask[1], !!mask[2]};
  const int64_t bias_sizes[1] = {in->c_out};
  stk s = {0};
  push_tensor(&s, g);
  push_tensor(&s, x);
  push_tensor(&s, w);
  if (mask[2])
    push_opt_ints(&s, bias_sizes, 1);
  else
    push_none(&s);
  push_conv_window(&s, in);
  push_ints(&s, m, 3);
  if (stk_call(ctx, &s, "aten::convolution_backward", "", 3, res))
    return SC_ERR;
  if (mask[0]) count_macs(1, g, conv_macs_per_output(in));
  if (mask[1]) count_macs(2, g, conv_macs_per_output(in));
  for (int i = 0; i < 3; i++)
    if (!mask[i]) _sc_drop(&res[i]); /* undefined tensors */
  return SC_OK;
}

int _sc_maxpool(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                AtenTensorHandle *out, AtenTensorHandle *indices) {
  AtenTensorHandle r[2];
  stk s = {0};
  push_tensor(&s, x);
  push_maxpool_window(&s, in);
  if (!indices) return stk_call(ctx, &s, "aten::max_pool2d", "", 1, out);
  if (stk_call(ctx, &s, "aten::max_pool2d_with_indices", "", 2, r))
    return SC_ERR;
  *out = r[0];
  *indices = r[1];
  return SC_OK;
}

int _sc_maxpool_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         const sc_instr *in, AtenTensorHandle indices,
                         AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, g);
  push_tensor(&s, x);
  push_maxpool_window(&s, in);
  push_tensor(&s, indices);
  return stk_call(ctx, &s, "aten::max_pool2d_with_indices_backward", "", 1,
                  out);
}

int _sc_avgpool(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                int64_t divisor_override, AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, x);
  push_avgpool_window(&s, in, divisor_override);
  return stk_call(ctx, &s, "aten::avg_pool2d", "", 1, out);
}

int _sc_avgpool_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         const sc_instr *in, int64_t divisor_override,
                         AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, g);
  push_tensor(&s, x);
  push_avgpool_window(&s, in, divisor_override);
  return stk_call(ctx, &s, "aten::avg_pool2d_backward", "", 1, out);
}

/* An uninitialised contiguous tensor of t's sizes in dtype. */
static int alloc_like(sc_ctx *ctx, const char *what, AtenTensorHandle t,
                      int32_t dtype, AtenTensorHandle *out) {
  int64_t dim, *sizes, *strides;
  *out = NULL;
  if (_sc_meta(ctx, t, &dim, &sizes, &strides)) return SC_ERR;
  return _sc_alloc(ctx, what, dtype, dim, sizes, 0, out);
}

/* A contiguous copy of t in dtype (aten::copy_ converts). */
static int copy_as(sc_ctx *ctx, const char *what, AtenTensorHandle t,
                   int32_t dtype, AtenTensorHandle *out) {
  if (alloc_like(ctx, what, t, dtype, out)) return SC_ERR;
  if (_sc_copy_across(ctx, *out, t)) {
    _sc_drop(out);
    return SC_ERR;
  }
  return SC_OK;
}

int32_t _sc_avg_map_dtype(const sc_ctx *ctx) {
  return _sc_is_half(ctx) ? aoti_torch_dtype_float32() : ctx->dtype;
}

int _sc_avgpool_div(sc_ctx *ctx, AtenTensorHandle x, const sc_instr *in,
                    AtenTensorHandle div, AtenTensorHandle *out) {
  *out = NULL;
  if (!_sc_is_half(ctx)) {
    if (_sc_avgpool(ctx, x, in, 1, out)) return SC_ERR;
    if (_sc_div_(ctx, *out, div)) {
      _sc_drop(out);
      return SC_ERR;
    }
    return SC_OK;
  }
  AtenTensorHandle xf = NULL, s = NULL;
  int rc = copy_as(ctx, "a float32 copy of an average pool's input", x,
                   aoti_torch_dtype_float32(), &xf) ||
           _sc_avgpool(ctx, xf, in, 1, &s);
  _sc_drop(&xf);
  if (!rc)
    rc = _sc_div_(ctx, s, div) ||
         copy_as(ctx, "an average pool's output", s, ctx->dtype, out);
  _sc_drop(&s);
  return rc ? SC_ERR : SC_OK;
}

int _sc_avgpool_div_backward(sc_ctx *ctx, AtenTensorHandle g,
                             AtenTensorHandle x, const sc_instr *in,
                             AtenTensorHandle div, AtenTensorHandle *out) {
  *out = NULL;
  AtenTensorHandle t = NULL, like = NULL, gi = NULL;
  int rc;
  if (!_sc_is_half(ctx)) {
    rc = _sc_div(ctx, g, div, &t) || _sc_avgpool_backward(ctx, t, x, in, 1, out);
    _sc_drop(&t);
    return rc ? SC_ERR : SC_OK;
  }
  /* the pool's backward reads only its input's shape: an uninitialised
   * float32 tensor of it (on the CPU its pages are never touched) */
  const int32_t f32 = aoti_torch_dtype_float32();
  rc = copy_as(ctx, "a float32 copy of an average pool's gradient", g, f32,
               &t) ||
       _sc_div_(ctx, t, div) ||
       alloc_like(ctx, "a float32 average pool input's shape", x, f32, &like) ||
       _sc_avgpool_backward(ctx, t, like, in, 1, &gi);
  _sc_drop(&t);
  _sc_drop(&like);
  if (!rc)
    rc = copy_as(ctx, "an average pool's input gradient", gi, ctx->dtype, out);
  _sc_drop(&gi);
  return rc ? SC_ERR : SC_OK;
}

/* ---- per-pixel channel ops: computed on the channels-last permutation,
 * exactly as the module they come from (LayerNorm2d, Linear after a
 * permute) computes them ---------------------------------------------------- */

static const int64_t to_nhwc[4] = {0, 2, 3, 1}, to_nchw[4] = {0, 3, 1, 2};

static int permute(sc_ctx *ctx, AtenTensorHandle x, const int64_t *dims,
                   AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, x);
  push_ints(&s, dims, 4);
  return stk_call(ctx, &s, "aten::permute", "", 1, out);
}

/* Size 0 of x: a weight's output channels. */
static int64_t size0(sc_ctx *ctx, AtenTensorHandle x) {
  int64_t dim, *sz, *st;
  return _sc_meta(ctx, x, &dim, &sz, &st) || dim < 1 ? -1 : sz[0];
}

/* Size 1 of x: the channels of an NCHW tensor, the inputs of a weight. */
static int64_t channels_of(sc_ctx *ctx, AtenTensorHandle x) {
  int64_t dim, *sz, *st;
  return _sc_meta(ctx, x, &dim, &sz, &st) || dim < 2 ? -1 : sz[1];
}

/* mean and rstd (for the backward) are optional outputs. */
static int layernorm_nhwc(sc_ctx *ctx, AtenTensorHandle xp, int64_t c,
                          AtenTensorHandle w, AtenTensorHandle b, double eps,
                          AtenTensorHandle r[3]) {
  stk s = {0};
  push_tensor(&s, xp);
  push_ints(&s, &c, 1);
  push_opt_tensor(&s, w);
  push_opt_tensor(&s, b);
  push_double(&s, eps);
  return stk_call(ctx, &s, "aten::native_layer_norm", "", 3, r);
}

int _sc_layernorm_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
                    AtenTensorHandle b, double eps, AtenTensorHandle *out) {
  AtenTensorHandle xp = NULL, r[3] = {NULL, NULL, NULL};
  const int64_t c = channels_of(ctx, x);
  int rc = c < 1 || permute(ctx, x, to_nhwc, &xp) ||
           layernorm_nhwc(ctx, xp, c, w, b, eps, r) ||
           permute(ctx, r[0], to_nchw, out);
  _sc_drop(&xp);
  drop_n(r, 3);
  return rc ? sc_fail(&ctx->err, "streamcnn: layer norm failed") : SC_OK;
}

int _sc_layernorm_c_backward(sc_ctx *ctx, AtenTensorHandle g,
                             AtenTensorHandle x, AtenTensorHandle w,
                             AtenTensorHandle b, double eps, const int mask[3],
                             AtenTensorHandle res[3]) {
  AtenTensorHandle xp = NULL, gp = NULL, r[3] = {NULL, NULL, NULL};
  AtenTensorHandle gi[3] = {NULL, NULL, NULL};
  const int64_t c = channels_of(ctx, x);
  const int64_t m[3] = {!!mask[0], !!mask[1], !!mask[2]};
  for (int i = 0; i < 3; i++) res[i] = NULL;
  /* mean and rstd are recomputed rather than held through the forward */
  int rc = c < 1 || permute(ctx, x, to_nhwc, &xp) ||
           permute(ctx, g, to_nhwc, &gp) ||
           layernorm_nhwc(ctx, xp, c, w, b, eps, r);
  if (!rc) {
    stk s = {0};
    push_tensor(&s, gp);
    push_tensor(&s, xp);
    push_ints(&s, &c, 1);
    push_tensor(&s, r[1]);
    push_tensor(&s, r[2]);
    push_opt_tensor(&s, w);
    push_opt_tensor(&s, b);
    push_ints(&s, m, 3);
    rc = stk_call(ctx, &s, "aten::native_layer_norm_backward", "", 3, gi);
  }
  if (!rc && mask[0]) rc = permute(ctx, gi[0], to_nchw, &res[0]);
  if (!rc) {
    for (int i = 1; i < 3; i++)
      if (mask[i]) {
        res[i] = gi[i];
        gi[i] = NULL;
      }
  }
  _sc_drop(&xp);
  _sc_drop(&gp);
  drop_n(r, 3);
  drop_n(gi, 3);
  if (rc) {
    drop_n(res, 3);
    return sc_fail(&ctx->err, "streamcnn: layer norm backward failed");
  }
  return SC_OK;
}

int _sc_linear_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle w,
                 AtenTensorHandle b, AtenTensorHandle *out) {
  AtenTensorHandle xp = NULL, y = NULL;
  int rc = permute(ctx, x, to_nhwc, &xp);
  if (!rc) {
    stk s = {0};
    push_tensor(&s, xp);
    push_tensor(&s, w);
    push_opt_tensor(&s, b);
    rc = stk_call(ctx, &s, "aten::linear", "", 1, &y);
  }
  if (!rc) rc = permute(ctx, y, to_nchw, out);
  if (!rc) count_macs(0, *out, (double)channels_of(ctx, x));
  _sc_drop(&xp);
  _sc_drop(&y);
  return rc;
}

/* t reshaped to (op "aten::reshape") or summed to (op "aten::sum_to_size")
 * the n sizes in v. */
static int to_sizes(sc_ctx *ctx, const char *op, AtenTensorHandle t,
                    const int64_t *v, int n, AtenTensorHandle *out) {
  stk s = {0};
  push_tensor(&s, t);
  push_ints(&s, v, n);
  return stk_call(ctx, &s, op, "", 1, out);
}

/* t summed to the 4-D shape keep (a per-channel gradient, as autograd's
 * sum_to_size), then reshaped to the n sizes in shape (its parameter's). */
static int sum_as(sc_ctx *ctx, AtenTensorHandle t, const int64_t keep[4],
                  const int64_t *shape, int n, AtenTensorHandle *out) {
  AtenTensorHandle sum = NULL;
  const int rc = to_sizes(ctx, "aten::sum_to_size", t, keep, 4, &sum) ||
                 to_sizes(ctx, "aten::reshape", sum, shape, n, out);
  _sc_drop(&sum);
  return rc;
}

static int reshape2(sc_ctx *ctx, AtenTensorHandle t, int64_t cols,
                    AtenTensorHandle *out) {
  const int64_t shape[2] = {-1, cols};
  return to_sizes(ctx, "aten::reshape", t, shape, 2, out);
}

/* As autograd differentiates linear (aten::linear_backward has no dense
 * CPU kernel): grad_input = g W, grad_weight = g^T x, grad_bias = sum g,
 * with the pixels flattened into rows. */
int _sc_linear_c_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                          AtenTensorHandle w, const int mask[3],
                          AtenTensorHandle res[3]) {
  AtenTensorHandle xp = NULL, gp = NULL, gi = NULL, g2 = NULL, x2 = NULL,
                   gt = NULL;
  /* x (read for the weight's gradient only) or the weight [c_out, c_in] */
  const int64_t c_in = mask[1] ? channels_of(ctx, x) : channels_of(ctx, w),
                c_out = channels_of(ctx, g);
  for (int i = 0; i < 3; i++) res[i] = NULL;
  int rc = c_in < 1 || c_out < 1 || permute(ctx, g, to_nhwc, &gp);
  if (!rc && mask[0])
    rc = call2(ctx, "aten::matmul", "", gp, w, &gi) ||
         permute(ctx, gi, to_nchw, &res[0]);
  if (!rc && (mask[1] || mask[2])) rc = reshape2(ctx, gp, c_out, &g2);
  if (!rc && mask[1])
    rc = permute(ctx, x, to_nhwc, &xp) || reshape2(ctx, xp, c_in, &x2) ||
         call1(ctx, "aten::t", "", g2, &gt) ||
         call2(ctx, "aten::mm", "", gt, x2, &res[1]);
  if (!rc && mask[2])
    rc = to_sizes(ctx, "aten::sum_to_size", g2, &c_out, 1, &res[2]);
  if (!rc && mask[0]) count_macs(1, g, (double)c_in);
  if (!rc && mask[1]) count_macs(2, g, (double)c_in);
  _sc_drop(&xp);
  _sc_drop(&gp);
  _sc_drop(&gi);
  _sc_drop(&g2);
  _sc_drop(&x2);
  _sc_drop(&gt);
  if (rc) drop_n(res, 3);
  return rc;
}

/* The scale as [1, C, 1, 1], whatever per-channel shape it has. */
static int scale4(sc_ctx *ctx, AtenTensorHandle s, int64_t c,
                  AtenTensorHandle *out) {
  const int64_t shape[4] = {1, c, 1, 1};
  return to_sizes(ctx, "aten::reshape", s, shape, 4, out);
}

int _sc_scale_c(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle s,
                AtenTensorHandle *out) {
  AtenTensorHandle s4 = NULL;
  const int64_t c = channels_of(ctx, x);
  int rc = c < 1 || scale4(ctx, s, c, &s4) ||
           call2(ctx, "aten::mul", "Tensor", x, s4, out);
  _sc_drop(&s4);
  return rc;
}

int _sc_scale_c_backward(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle x,
                         AtenTensorHandle s, const int mask[2],
                         AtenTensorHandle res[2]) {
  AtenTensorHandle s4 = NULL, gx = NULL;
  const int64_t c = channels_of(ctx, g); /* x: the weight's gradient only */
  res[0] = res[1] = NULL;
  int rc = c < 1 || scale4(ctx, s, c, &s4);
  if (!rc && mask[0]) rc = call2(ctx, "aten::mul", "Tensor", g, s4, &res[0]);
  if (!rc && mask[1]) { /* as autograd: sum_to_size(g * x), in s's shape */
    const int64_t keep[4] = {1, c, 1, 1};
    int64_t dim, *sz, *st;
    rc = call2(ctx, "aten::mul", "Tensor", g, x, &gx) ||
         _sc_meta(ctx, s, &dim, &sz, &st) ||
         sum_as(ctx, gx, keep, sz, (int)dim, &res[1]);
  }
  _sc_drop(&s4);
  _sc_drop(&gx);
  if (rc) drop_n(res, 2);
  return rc;
}

/* p4: weight (or NULL), bias (or NULL), running_mean, running_var. */
int _sc_batchnorm(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle const *p4,
                  double eps, AtenTensorHandle *out) {
  AtenTensorHandle r[3];
  stk s = {0};
  push_tensor(&s, x);
  push_opt_tensor(&s, p4[0]);
  push_opt_tensor(&s, p4[1]);
  push_opt_tensor(&s, p4[2]);
  push_opt_tensor(&s, p4[3]);
  push_bool(&s, 0); /* training: frozen statistics */
  push_double(&s, 0.0);
  push_double(&s, eps);
  if (stk_call(ctx, &s, "aten::native_batch_norm", "", 3, r)) return SC_ERR;
  *out = r[0];
  _sc_drop(&r[1]);
  _sc_drop(&r[2]);
  return SC_OK;
}

int _sc_channel_sum(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle *out) {
  const int64_t c = channels_of(ctx, g), keep[4] = {1, c, 1, 1};
  *out = NULL;
  if (c < 1) return sc_fail(&ctx->err, "streamcnn: internal error: channels");
  return sum_as(ctx, g, keep, &c, 1, out);
}

/* A frozen batch norm's per-channel factors, as PyTorch computes them:
 * inv = 1 / sqrt(var + eps) and scale = gamma * inv (inv itself without
 * gamma); new references. */
static int bn_factors(sc_ctx *ctx, AtenTensorHandle const *p4, double eps,
                      AtenTensorHandle *inv, AtenTensorHandle *scale) {
  AtenTensorHandle e = NULL, ve = NULL, sd = NULL;
  *inv = *scale = NULL;
  int rc = scalar_tensor(ctx, eps, &e) || _sc_add(ctx, p4[3], e, &ve) ||
           call1(ctx, "aten::sqrt", "", ve, &sd) ||
           call1(ctx, "aten::reciprocal", "", sd, inv);
  if (!rc && p4[0])
    rc = call2(ctx, "aten::mul", "Tensor", *inv, p4[0], scale);
  else if (!rc && aoti_torch_new_tensor_handle(*inv, scale))
    rc = sc_fail(&ctx->err, "streamcnn: cannot reference a tensor");
  _sc_drop(&e);
  _sc_drop(&ve);
  _sc_drop(&sd);
  if (rc) {
    _sc_drop(inv);
    _sc_drop(scale);
  }
  return rc;
}

/* Frozen statistics make batch norm affine, y = x * w / sqrt(var + eps) +
 * ..., so without the weight's gradient the input is not needed: the
 * input's gradient is g * w / sqrt(var + eps), the bias's the sum of g. */
static int batchnorm_backward_affine(sc_ctx *ctx, AtenTensorHandle g,
                                     AtenTensorHandle const *p4, double eps,
                                     const int mask[3],
                                     AtenTensorHandle res[3]) {
  AtenTensorHandle inv = NULL, sc = NULL, s4 = NULL;
  int rc = SC_OK;
  if (mask[0])
    rc = bn_factors(ctx, p4, eps, &inv, &sc) ||
         scale4(ctx, sc, channels_of(ctx, g), &s4) ||
         call2(ctx, "aten::mul", "Tensor", g, s4, &res[0]);
  if (!rc && mask[2]) rc = _sc_channel_sum(ctx, g, &res[2]);
  _sc_drop(&inv);
  _sc_drop(&sc);
  _sc_drop(&s4);
  if (rc) drop_n(res, 3);
  return rc;
}

int _sc_batchnorm_backward(sc_ctx *ctx, AtenTensorHandle g,
                           AtenTensorHandle x, AtenTensorHandle const *p4,
                           double eps, const int mask[3],
                           AtenTensorHandle res[3]) {
  int64_t m[3] = {!!mask[0], !!mask[1], !!mask[2]};
  stk s = {0};
  for (int i = 0; i < 3; i++) res[i] = NULL;
  int32_t gd = 0, pd = 0;
  if (aoti_torch_get_dtype(g, &gd) || aoti_torch_get_dtype(p4[2], &pd))
    return sc_fail(&ctx->err, "streamcnn: cannot read a batch norm's dtype");
  /* float32 statistics with half-precision values: ATen's mixed-dtype
   * kernel, which forms g * w / sqrt(var + eps) in float32 and rounds once,
   * as the whole-image pass does; in eval mode only the weight's gradient
   * depends on the input, so without it g stands in for the input */
  const int mixed = gd != pd;
  if (!mask[1] && !mixed)
    return batchnorm_backward_affine(ctx, g, p4, eps, mask, res);
  push_tensor(&s, g);
  push_tensor(&s, x ? x : g);
  push_opt_tensor(&s, p4[0]);
  push_opt_tensor(&s, p4[2]);
  push_opt_tensor(&s, p4[3]);
  push_none(&s); /* save_mean: eval mode uses the running statistics */
  push_none(&s); /* save_invstd */
  push_bool(&s, 0);
  push_double(&s, eps);
  push_ints(&s, m, 3);
  if (stk_call(ctx, &s, "aten::native_batch_norm_backward", "", 3, res))
    return SC_ERR;
  for (int i = 0; i < 3; i++)
    if (!mask[i]) _sc_drop(&res[i]);
  return SC_OK;
}

/* a - b */
static int sub(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
               AtenTensorHandle *out) {
  *out = NULL;
  if (aoti_torch_aten_subtract_Tensor(a, b, 1.0, out))
    return sc_fail(&ctx->err, "streamcnn: aten::sub failed inside PyTorch");
  return SC_OK;
}

/* a - b, with a missing a (NULL: an absent bias) taken as 0. */
static int sub_from_opt(sc_ctx *ctx, AtenTensorHandle a, AtenTensorHandle b,
                        AtenTensorHandle *out) {
  return a ? sub(ctx, a, b, out) : call1(ctx, "aten::neg", "", b, out);
}

/* A per-channel [C] tensor as [C, 1, 1, 1] (a weight's output channels). */
static int per_out_channel(sc_ctx *ctx, AtenTensorHandle t, int64_t c,
                           AtenTensorHandle *out) {
  const int64_t shape[4] = {c, 1, 1, 1};
  return to_sizes(ctx, "aten::reshape", t, shape, 4, out);
}

/* rc, with a message where the failing step left none (a bad size). */
static int internal_unless_said(sc_ctx *ctx, int rc, const char *what) {
  if (!rc) return SC_OK;
  return ctx->err.set ? SC_ERR
                      : sc_fail(&ctx->err, "streamcnn: internal error: %s",
                                what);
}

int _sc_fold_bn(sc_ctx *ctx, AtenTensorHandle w, AtenTensorHandle b,
                AtenTensorHandle const *p4, double eps,
                AtenTensorHandle out[4]) {
  AtenTensorHandle ms = NULL, s4 = NULL, bs = NULL, shift = NULL;
  const int64_t c = size0(ctx, w);
  for (int k = 0; k < 4; k++) out[k] = NULL;
  /* as PyTorch's frozen batch norm: shift = beta - mean * scale */
  int rc = c < 1 || bn_factors(ctx, p4, eps, &out[3], &out[2]) ||
           call2(ctx, "aten::mul", "Tensor", p4[2], out[2], &ms);
  if (!rc) rc = sub_from_opt(ctx, p4[1], ms, &shift);
  if (!rc)
    rc = per_out_channel(ctx, out[2], c, &s4) ||
         call2(ctx, "aten::mul", "Tensor", w, s4, &out[0]);
  if (!rc && b)
    rc = call2(ctx, "aten::mul", "Tensor", b, out[2], &bs) ||
         _sc_add(ctx, bs, shift, &out[1]);
  if (!rc && !b) {
    out[1] = shift;
    shift = NULL;
  }
  _sc_drop(&ms);
  _sc_drop(&s4);
  _sc_drop(&bs);
  _sc_drop(&shift);
  if (rc) drop_n(out, 4);
  return internal_unless_said(ctx, rc, "folding a batch norm");
}

int _sc_fold_bn_grads(sc_ctx *ctx, AtenTensorHandle w, AtenTensorHandle b,
                      AtenTensorHandle const *p4, AtenTensorHandle const *fold,
                      AtenTensorHandle gw, AtenTensorHandle gs,
                      const int want[4], AtenTensorHandle res[4]) {
  AtenTensorHandle s4 = NULL, wg = NULL, dot = NULL, bm = NULL, bms = NULL,
                   sum = NULL;
  const int64_t c = size0(ctx, w), c4[4] = {c, 1, 1, 1};
  for (int k = 0; k < 4; k++) res[k] = NULL;
  int rc = c < 1;
  if (!rc && want[0]) /* d/dw = scale * d/dw' */
    rc = per_out_channel(ctx, fold[2], c, &s4) ||
         call2(ctx, "aten::mul", "Tensor", gw, s4, &res[0]);
  if (!rc && want[1]) /* d/db = scale * sum g */
    rc = call2(ctx, "aten::mul", "Tensor", gs, fold[2], &res[1]);
  if (!rc && want[2]) {
    /* d/dgamma = inv * sum g (x - mean), x = conv(in, w) + b, and
     * sum_p g x = <w, d/dw'> + b sum_p g (the weight gradient is the same
     * sum, reassociated): inv * (<w, gw> + (b - mean) gs) */
    rc = call2(ctx, "aten::mul", "Tensor", w, gw, &wg) ||
         sum_as(ctx, wg, c4, &c, 1, &dot) ||
         sub_from_opt(ctx, b, p4[2], &bm) ||
         call2(ctx, "aten::mul", "Tensor", bm, gs, &bms) ||
         _sc_add(ctx, dot, bms, &sum) ||
         call2(ctx, "aten::mul", "Tensor", sum, fold[3], &res[2]);
  }
  if (!rc && want[3]) rc = call1(ctx, "aten::clone", "", gs, &res[3]);
  _sc_drop(&s4);
  _sc_drop(&wg);
  _sc_drop(&dot);
  _sc_drop(&bm);
  _sc_drop(&bms);
  _sc_drop(&sum);
  if (rc) drop_n(res, 4);
  return internal_unless_said(ctx, rc, "batch-norm gradients");
}

static int slope_tensor(sc_ctx *ctx, const sc_instr *in,
                        AtenTensorHandle *out) {
  return scalar_tensor(ctx, in->act_arg, out);
}

static const char *gelu_mode(const sc_instr *in) {
  return in->act_iarg ? "tanh" : "none";
}

/* *out = x > 0 ? v : v * slope (a leaky ReLU of x: v = x; its backward:
 * v = its output's gradient), selected in place of v * slope: no
 * temporary but the mask. */
static int leaky_select(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle x,
                        AtenTensorHandle v, AtenTensorHandle *out) {
  AtenTensorHandle zero = NULL, slope = NULL, mask = NULL, vs = NULL,
                   ret = NULL;
  *out = NULL;
  if (const_zero(ctx, &zero) || slope_tensor(ctx, in, &slope)) return SC_ERR;
  int rc = call2(ctx, "aten::mul", "Tensor", v, slope, &vs);
  if (!rc) rc = call2(ctx, "aten::gt", "Tensor", x, zero, &mask);
  if (!rc) {
    stk s = {0};
    push_tensor(&s, mask);
    push_tensor(&s, v);
    push_tensor(&s, vs);
    push_tensor(&s, vs); /* out: the selection is elementwise */
    rc = stk_call(ctx, &s, "aten::where", "self_out", 1, &ret);
  }
  _sc_drop(&slope);
  _sc_drop(&mask);
  _sc_drop(&ret);
  if (rc) {
    _sc_drop(&vs);
    return rc;
  }
  *out = vs;
  return SC_OK;
}

int _sc_act(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle x,
            AtenTensorHandle *out) {
  AtenTensorHandle zero = NULL, six = NULL;
  *out = NULL;
  switch (in->act) {
  case SC_ACT_RELU: return call1(ctx, "aten::relu", "", x, out);
  case SC_ACT_SILU: return call1(ctx, "aten::silu", "", x, out);
  case SC_ACT_SIGMOID: return call1(ctx, "aten::sigmoid", "", x, out);
  case SC_ACT_TANH: return call1(ctx, "aten::tanh", "", x, out);
  case SC_ACT_HARDSWISH: return call1(ctx, "aten::hardswish", "", x, out);
  case SC_ACT_GELU: {
    stk s = {0};
    push_tensor(&s, x);
    push_string(&s, gelu_mode(in));
    return stk_call(ctx, &s, "aten::gelu", "", 1, out);
  }
  case SC_ACT_RELU6: { /* hardtanh(x, 0, 6) == clamp(x, 0, 6) */
    if (const_zero(ctx, &zero) || const_six(ctx, &six)) return SC_ERR;
    stk s = {0};
    push_tensor(&s, x);
    push_opt_tensor(&s, zero);
    push_opt_tensor(&s, six);
    return stk_call(ctx, &s, "aten::clamp", "Tensor", 1, out);
  }
  case SC_ACT_LEAKY_RELU: /* x > 0 ? x : x * slope, as ATen computes it */
    return leaky_select(ctx, in, x, x, out);
  default:
    return sc_fail(&ctx->err, "streamcnn: internal error: activation %d",
                   in->act);
  }
}

int _sc_relu_(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle *out) {
  return call1(ctx, "aten::relu_", "", x, out);
}

/* dst = relu(x) written in place of dst (a view, any strides): maximum(x, 0)
 * propagates NaN as relu does. */
int _sc_relu_into(sc_ctx *ctx, AtenTensorHandle x, AtenTensorHandle dst) {
  AtenTensorHandle zero = NULL, ret = NULL;
  if (const_zero(ctx, &zero) ||
      call3(ctx, "aten::maximum", "out", x, zero, dst, &ret))
    return SC_ERR;
  _sc_drop(&ret);
  return SC_OK;
}

int _sc_relu_backward_(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle y) {
  AtenTensorHandle zero = NULL, mask = NULL, r = NULL;
  if (const_zero(ctx, &zero) ||
      call2(ctx, "aten::le", "Tensor", y, zero, &mask))
    return SC_ERR;
  int rc = call3(ctx, "aten::masked_fill_", "Tensor", g, mask, zero, &r);
  _sc_drop(&mask);
  _sc_drop(&r);
  return rc;
}

int _sc_act_backward(sc_ctx *ctx, const sc_instr *in, AtenTensorHandle g,
                     AtenTensorHandle x, AtenTensorHandle y,
                     AtenTensorHandle *out) {
  AtenTensorHandle zero = NULL, six = NULL, m[3] = {NULL, NULL, NULL};
  int rc;
  *out = NULL;
  switch (in->act) {
  case SC_ACT_RELU: /* threshold_backward(g, y, 0): y > 0 ? g : 0 */
    if (const_zero(ctx, &zero)) return SC_ERR;
    rc = call2(ctx, "aten::gt", "Tensor", y, zero, &m[0]);
    if (!rc) rc = call3(ctx, "aten::where", "self", m[0], g, zero, out);
    break;
  case SC_ACT_RELU6: /* hardtanh_backward: 0 < x < 6 ? g : 0 */
    if (const_zero(ctx, &zero) || const_six(ctx, &six)) return SC_ERR;
    rc = call2(ctx, "aten::gt", "Tensor", x, zero, &m[0]);
    if (!rc) rc = call2(ctx, "aten::lt", "Tensor", x, six, &m[1]);
    if (!rc) rc = call2(ctx, "aten::logical_and", "", m[0], m[1], &m[2]);
    if (!rc) rc = call3(ctx, "aten::where", "self", m[2], g, zero, out);
    break;
  case SC_ACT_LEAKY_RELU: /* x > 0 ? g : g * slope */
    return leaky_select(ctx, in, x, g, out);
  case SC_ACT_SILU:
    return call2(ctx, "aten::silu_backward", "", g, x, out);
  case SC_ACT_SIGMOID:
    return call2(ctx, "aten::sigmoid_backward", "", g, y, out);
  case SC_ACT_TANH:
    return call2(ctx, "aten::tanh_backward", "", g, y, out);
  case SC_ACT_HARDSWISH:
    return call2(ctx, "aten::hardswish_backward", "", g, x, out);
  case SC_ACT_GELU: {
    stk s = {0};
    push_tensor(&s, g);
    push_tensor(&s, x);
    push_string(&s, gelu_mode(in));
    return stk_call(ctx, &s, "aten::gelu_backward", "", 1, out);
  }
  default:
    return sc_fail(&ctx->err, "streamcnn: internal error: activation %d",
                   in->act);
  }
  drop_n(m, 3);
  return rc;
}

/* ---- non-zeros (the sparse backward) ------------------------------------- */

int _sc_nonzero_map(sc_ctx *ctx, AtenTensorHandle g, AtenTensorHandle *out) {
  static const int64_t batch_channels[2] = {0, 1};
  AtenTensorHandle zero = NULL, nz = NULL, m = NULL;
  *out = NULL;
  if (const_zero(ctx, &zero) || call2(ctx, "aten::ne", "Tensor", g, zero, &nz))
    return SC_ERR;
  stk s = {0};
  push_tensor(&s, nz);
  push_opt_ints(&s, batch_channels, 2);
  push_bool(&s, 0);
  int rc = stk_call(ctx, &s, "aten::any", "dims", 1, &m);
  _sc_drop(&nz);
  if (rc || !ctx->is_cuda) {
    *out = m;
    return rc;
  }
  int64_t dim, *sz, *st; /* to host memory, for the caller to read */
  rc = _sc_meta(ctx, m, &dim, &sz, &st);
  if (!rc) {
    const int64_t strides[2] = {sz[1], 1};
    if (aoti_torch_empty_strided(2, sz, strides, aoti_torch_dtype_bool(),
                                 aoti_torch_device_type_cpu(), 0, out))
      rc = sc_fail(&ctx->err, "streamcnn: could not allocate a map");
  }
  if (!rc) rc = _sc_copy_across(ctx, *out, m);
  if (rc) _sc_drop(out);
  _sc_drop(&m);
  return rc;
}
