// tile.cu — CUDA tile kernels (see kernels/tile.h); same semantics and the
// same validation, in the same order, as kernels/cpu/tile.c. Launched on
// the caller's current stream; never synchronises.
#include "tile.h"

#include <cuda_runtime.h>
#include <stdio.h>

// Records the failing expression, file and line in err; returns 1.
#define SC_CUDA_CHECK(expr)                                                  \
  do {                                                                       \
    cudaError_t sc_e_ = (expr);                                              \
    if (sc_e_ != cudaSuccess) {                                              \
      if (err && errlen)                                                     \
        snprintf(err, errlen, "%s failed at %s:%d: %s", #expr, __FILE__,     \
                 __LINE__, cudaGetErrorString(sc_e_));                       \
      return 1;                                                              \
    }                                                                        \
  } while (0)

static int fail_msg(char *err, size_t errlen, const char *msg) {
  if (err && errlen) snprintf(err, errlen, "%s", msg);
  return 1;
}

namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the device; the grid-stride loops cover the rest.
unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return (unsigned)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

template <typename T>
__global__ void copy_kernel(sc_copy_params p, int64_t total) {
  const int64_t C = p.size[1], H = p.size[2], W = p.size[3];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = i % W, y = (i / W) % H, c = (i / (W * H)) % C,
                  n = i / (W * H * C);
    const T s = static_cast<const T *>(p.src)[n * p.src_stride[0] +
                                              c * p.src_stride[1] +
                                              y * p.src_stride[2] +
                                              x * p.src_stride[3]];
    T *d = static_cast<T *>(p.dst) + n * p.dst_stride[0] +
           c * p.dst_stride[1] + y * p.dst_stride[2] + x * p.dst_stride[3];
    *d = p.accumulate ? *d + s : s;
  }
}

template <typename T, typename S>
__global__ void gather_kernel(sc_gather_params p, int64_t total) {
  const T pad = static_cast<T>(p.pad_value);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t x = i % p.dst_w, y = (i / p.dst_w) % p.dst_h,
                  c = (i / (p.dst_w * p.dst_h)) % p.c,
                  n = i / (p.dst_w * p.dst_h * p.c);
    const int64_t sy = y - p.off_h, sx = x - p.off_w;
    T v = pad;
    if (sy >= 0 && sy < p.src_h && sx >= 0 && sx < p.src_w)
      v = static_cast<T>(static_cast<const S *>(p.src)[n * p.src_stride[0] +
                                                       c * p.src_stride[1] +
                                                       sy * p.src_stride[2] +
                                                       sx * p.src_stride[3]]);
    const int64_t di = p.channels_last
                           ? ((n * p.dst_h + y) * p.dst_w + x) * p.c + c
                           : i;
    static_cast<T *>(p.dst)[di] = v;
  }
}

}  // namespace

extern "C" int sc_copy_cuda(const sc_copy_params *p, void *stream, char *err,
                            size_t errlen) {
  const char *bad = sc_copy_check(p);
  if (bad) return fail_msg(err, errlen, bad);
  const int64_t total = p->size[0] * p->size[1] * p->size[2] * p->size[3];
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p->dtype == SC_DTYPE_F32)
    copy_kernel<float><<<blocks_for(total), kThreads, 0, s>>>(*p, total);
  else
    copy_kernel<double><<<blocks_for(total), kThreads, 0, s>>>(*p, total);
  SC_CUDA_CHECK(cudaGetLastError());
  return 0;
}

extern "C" int sc_gather_cuda(const sc_gather_params *p, void *stream,
                              char *err, size_t errlen) {
  const char *bad = sc_gather_check(p);
  if (bad) return fail_msg(err, errlen, bad);
  const int64_t total = p->n * p->c * p->dst_h * p->dst_w;
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned b = blocks_for(total);
  const bool u8 = p->src_dtype == SC_DTYPE_U8;
  if (p->dtype == SC_DTYPE_F32) {
    if (u8)
      gather_kernel<float, uint8_t><<<b, kThreads, 0, s>>>(*p, total);
    else
      gather_kernel<float, float><<<b, kThreads, 0, s>>>(*p, total);
  } else {
    if (u8)
      gather_kernel<double, uint8_t><<<b, kThreads, 0, s>>>(*p, total);
    else
      gather_kernel<double, double><<<b, kThreads, 0, s>>>(*p, total);
  }
  SC_CUDA_CHECK(cudaGetLastError());
  return 0;
}
