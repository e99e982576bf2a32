// tile_elem.cuh — one element of the CUDA tile kernels (kernels/tile.h),
// compiled for the device by tile.cu and for the host by
// tests/cuda/test_tile_elem.cu, which runs them against the CPU kernels on
// a machine without a GPU. Only the launch is left out of that test.
#ifndef STREAMCNN_KERNELS_CUDA_TILE_ELEM_CUH
#define STREAMCNN_KERNELS_CUDA_TILE_ELEM_CUH

#include "tile.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace sc_tile {

#define SC_HD __host__ __device__ inline

// Values travel as A (float, or double for float64) between the types.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
// A copy's sum is formed in double when either side is float64 (as the CPU
// kernel forms it), then rounded once to the destination.
template <typename T, typename S> struct Acc2 { using type = typename Acc<T>::type; };
template <typename T> struct Acc2<T, double> { using type = double; };
template <typename A> SC_HD A to_acc(float v) { return static_cast<A>(v); }
template <typename A> SC_HD A to_acc(double v) { return static_cast<A>(v); }
template <typename A> SC_HD A to_acc(uint8_t v) { return static_cast<A>(v); }
template <typename A> SC_HD A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> SC_HD A to_acc(__nv_bfloat16 v) {
  return static_cast<A>(__bfloat162float(v));
}
template <typename T> SC_HD T from_acc(double v) { return static_cast<T>(v); }
template <> SC_HD float from_acc<float>(double v) { return static_cast<float>(v); }
template <> SC_HD __half from_acc<__half>(double v) {
  return __float2half_rn(static_cast<float>(v));
}
template <> SC_HD __nv_bfloat16 from_acc<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}

// u * a + b with both operations rounded, as the CPU kernels compute it:
// nvcc would otherwise contract it into one fused multiply-add.
SC_HD float mul_add(float u, float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(u, a), b);
#else
  return u * a + b;
#endif
}
SC_HD double mul_add(double u, double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(__dmul_rn(u, a), b);
#else
  return u * a + b;
#endif
}
// Element i of a copy, the window walked in N, C, H, W order, W fastest.
// copy_walk_order permutes the window first so that consecutive i are
// consecutive in the destination.
template <typename T, typename S>
SC_HD void copy_elem(const sc_copy_params &p, int64_t i) {
  using A = typename Acc2<T, S>::type;
  const int64_t C = p.size[1], H = p.size[2], W = p.size[3];
  const int64_t x = i % W, y = (i / W) % H, c = (i / (W * H)) % C,
                n = i / (W * H * C);
  const A s = to_acc<A>(static_cast<const S *>(p.src)[n * p.src_stride[0] +
                                                     c * p.src_stride[1] +
                                                     y * p.src_stride[2] +
                                                     x * p.src_stride[3]]);
  T *d = static_cast<T *>(p.dst) + n * p.dst_stride[0] + c * p.dst_stride[1] +
         y * p.dst_stride[2] + x * p.dst_stride[3];
  *d = from_acc<T>(p.accumulate ? mul_add(s, A(1), to_acc<A>(*d)) : s); /* s + d */
}

// The same copy with its dimensions reordered (the operation is unchanged:
// sizes and both strides move together) so that the destination's
// unit-stride dimension is walked fastest: C for a channels-last
// destination. Coalesced stores.
inline sc_copy_params copy_walk_order(const sc_copy_params &p) {
  sc_copy_params q = p;
  if (p.size[1] > 1 && p.dst_stride[1] == 1 && p.dst_stride[3] != 1) {
    const int ord[4] = {0, 2, 3, 1};
    for (int k = 0; k < 4; k++) {
      q.size[k] = p.size[ord[k]];
      q.src_stride[k] = p.src_stride[ord[k]];
      q.dst_stride[k] = p.dst_stride[ord[k]];
    }
  }
  return q;
}

// A normalisation constant: float32, or the tile's own dtype T.
template <typename T, typename A>
SC_HD A affine_at(const sc_gather_params &p, const void *v, int64_t i) {
  return p.affine_dtype == SC_DTYPE_F32 ? to_acc<A>(static_cast<const float *>(v)[i])
                                        : to_acc<A>(static_cast<const T *>(v)[i]);
}

// Element i of the dense destination, in its memory order (NCHW, or NHWC
// when channels_last): consecutive i are consecutive stores.
template <typename T, typename S>
SC_HD void gather_elem(const sc_gather_params &p, int64_t i) {
  using A = typename Acc<T>::type;
  int64_t n, c, y, x;
  if (p.channels_last) {
    c = i % p.c;
    x = (i / p.c) % p.dst_w;
    y = (i / (p.c * p.dst_w)) % p.dst_h;
    n = i / (p.c * p.dst_w * p.dst_h);
  } else {
    x = i % p.dst_w;
    y = (i / p.dst_w) % p.dst_h;
    c = (i / (p.dst_w * p.dst_h)) % p.c;
    n = i / (p.dst_w * p.dst_h * p.c);
  }
  const int64_t sy = y - p.off_h, sx = x - p.off_w;
  T v = from_acc<T>(p.pad_value);
  if (sy >= 0 && sy < p.src_h && sx >= 0 && sx < p.src_w) {
    A u = to_acc<A>(static_cast<const S *>(p.src)[n * p.src_stride[0] +
                                                  c * p.src_stride[1] +
                                                  sy * p.src_stride[2] +
                                                  sx * p.src_stride[3]]);
    if (p.scale) /* normalised: u * scale[c] + shift[c] */
      u = mul_add(u, affine_at<T, A>(p, p.scale, c * p.scale_stride),
                  p.shift ? affine_at<T, A>(p, p.shift, c * p.shift_stride)
                          : A(0));
    v = from_acc<T>(u);
  }
  static_cast<T *>(p.dst)[i] = v;
}

// Call L::go<T, S>(p, total, s) for the sc_dtype pair (dst, src); false if
// the pair is not supported.
template <typename L, typename T, typename P>
bool dispatch_src(int src, const P &p, int64_t total, cudaStream_t s) {
  switch (src) {
  case SC_DTYPE_F32: L::template go<T, float>(p, total, s); return true;
  case SC_DTYPE_F64: L::template go<T, double>(p, total, s); return true;
  case SC_DTYPE_U8: L::template go<T, uint8_t>(p, total, s); return true;
  case SC_DTYPE_F16: L::template go<T, __half>(p, total, s); return true;
  case SC_DTYPE_BF16: L::template go<T, __nv_bfloat16>(p, total, s); return true;
  default: return false;
  }
}

template <typename L, typename P>
bool dispatch2(int dst, int src, const P &p, int64_t total, cudaStream_t s) {
  switch (dst) {
  case SC_DTYPE_F32: return dispatch_src<L, float>(src, p, total, s);
  case SC_DTYPE_F64: return dispatch_src<L, double>(src, p, total, s);
  case SC_DTYPE_F16: return dispatch_src<L, __half>(src, p, total, s);
  case SC_DTYPE_BF16: return dispatch_src<L, __nv_bfloat16>(src, p, total, s);
  default: return false;
  }
}

#undef SC_HD

}  // namespace sc_tile

#endif  // STREAMCNN_KERNELS_CUDA_TILE_ELEM_CUH
