// test_tile_elem.cu — the CUDA tile kernels' element code
// (kernels/cuda/tile_elem.cuh), compiled for the host, against the CPU
// kernels (kernels/cpu/tile.c) on random windows: every dtype pair, NCHW
// and channels-last, strided and broadcast sources, border padding, the
// normalising scale / shift with tile-dtype and float32 constants, the
// accumulating copy. Results must be bit-identical. Needs no GPU: only the
// launch (grid-stride loop over the same element function) is not run.
#include "testutil.h"
#include "cuda/tile_elem.cuh"

#include <math.h>
#include <stdlib.h>

#include <vector>

// The CPU kernels split their rows with torch_parallel_for; here, serially.
extern "C" {
typedef void (*ParallelFunc)(int64_t begin, int64_t end, void *ctx);
int32_t torch_parallel_for(int64_t begin, int64_t end, int64_t grain,
                           ParallelFunc fn, void *ctx) {
  (void)grain;
  if (begin < end) fn(begin, end, ctx);
  return 0;
}
}

using namespace sc_tile;

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t next() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)(g_rng >> 16);
}
static int64_t pick(int64_t lo, int64_t hi) { return lo + next() % (hi - lo + 1); }

static size_t dtype_bytes(int d) {
  return d == SC_DTYPE_F64 ? 8 : d == SC_DTYPE_F32 ? 4 : d == SC_DTYPE_U8 ? 1 : 2;
}

// A random value of dtype d at element i: signed, of several magnitudes,
// -0.0 and, for half dtypes, raw bit patterns (subnormals, infinities);
// never NaN.
static void fill(int d, std::vector<unsigned char> &buf, int64_t count) {
  buf.assign((size_t)count * dtype_bytes(d), 0);
  for (int64_t i = 0; i < count; i++) {
    const uint32_t r = next();
    double v = ldexp((double)(int32_t)next(), (int)(r % 24) - 40);
    if (r % 17 == 0) v = -0.0;
    switch (d) {
    case SC_DTYPE_F32: ((float *)buf.data())[i] = (float)v; break;
    case SC_DTYPE_F64: ((double *)buf.data())[i] = v; break;
    case SC_DTYPE_U8: buf[i] = (unsigned char)r; break;
    default: {
      uint16_t h = (uint16_t)next();
      const bool nan = d == SC_DTYPE_F16 ? (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)
                                         : (h & 0x7f80u) == 0x7f80u && (h & 0x7fu);
      if (nan) h &= 0x83ffu;
      ((uint16_t *)buf.data())[i] = h;
    }
    }
  }
}

// The element code over the whole range, as the kernels' grid-stride loop.
struct HostCopy {
  template <typename T, typename S>
  static void go(const sc_copy_params &p, int64_t total, cudaStream_t) {
    for (int64_t i = 0; i < total; i++) copy_elem<T, S>(p, i);
  }
};
struct HostGather {
  template <typename T, typename S>
  static void go(const sc_gather_params &p, int64_t total, cudaStream_t) {
    for (int64_t i = 0; i < total; i++) gather_elem<T, S>(p, i);
  }
};

static const int kDst[4] = {SC_DTYPE_F32, SC_DTYPE_F64, SC_DTYPE_F16, SC_DTYPE_BF16};
static const int kSrc[5] = {SC_DTYPE_F32, SC_DTYPE_F64, SC_DTYPE_U8, SC_DTYPE_F16,
                            SC_DTYPE_BF16};

static int gather_case(int ddt, int sdt, int k) {
  sc_gather_params p = {};
  p.n = pick(1, 2);
  p.c = pick(1, 5);
  p.src_h = pick(k % 7 == 0 ? 0 : 1, 9);
  p.src_w = pick(k % 11 == 0 ? 0 : 1, 9);
  p.off_h = pick(0, 3);
  p.off_w = pick(0, 3);
  p.dst_h = p.off_h + p.src_h + pick(0, 3);
  p.dst_w = p.off_w + p.src_w + pick(0, 3);
  p.channels_last = (int)(next() % 2);
  p.pad_value = next() % 2 ? 0.0 : -INFINITY;
  p.dtype = ddt;
  p.src_dtype = sdt == ddt && next() % 2 ? 0 : sdt;
  // the source: a window of a bigger NCHW or NHWC image, at an offset
  const int64_t big[4] = {p.n + 1, p.c + 1, p.src_h + 3, p.src_w + 4};
  dense_strides(big, next() % 2, p.src_stride);
  std::vector<unsigned char> src, scale, shift;
  fill(sdt, src, big[0] * big[1] * big[2] * big[3]);
  const int64_t origin = p.src_stride[0] * (int64_t)(next() % 2) +
                         p.src_stride[1] * (int64_t)(next() % 2) +
                         p.src_stride[2] * 2 + p.src_stride[3] * 3;
  p.src = src.data() + origin * dtype_bytes(sdt);
  if (p.src_h == 0 || p.src_w == 0) p.src = next() % 2 ? nullptr : p.src;
  // normalisation: none, scale only, scale and shift; constants of the
  // tile's dtype (float32 / float64 tiles) or float32
  const int affine = (int)(next() % 3);
  if (affine) {
    p.affine_dtype = ddt == SC_DTYPE_F32 || ddt == SC_DTYPE_F64 ? (next() % 2 ? SC_DTYPE_F32 : 0)
                                                                : (next() % 2 ? SC_DTYPE_F32 : 0);
    const int cdt = p.affine_dtype ? p.affine_dtype : ddt;
    p.scale_stride = pick(0, 2);
    p.shift_stride = pick(0, 2);
    fill(cdt, scale, p.c * 2 + 1);
    fill(cdt, shift, p.c * 2 + 1);
    p.scale = scale.data();
    if (affine == 2) p.shift = shift.data();
  }
  const int64_t total = p.n * p.c * p.dst_h * p.dst_w;
  const size_t bytes = (size_t)total * dtype_bytes(ddt);
  std::vector<unsigned char> cpu(bytes, 0xA5), dev(bytes, 0x5A);
  p.dst = cpu.data();
  if (sc_gather_cpu(&p) != 0) {
    fprintf(stderr, "gather case %d: the CPU kernel refused it\n", k);
    return 1;
  }
  p.dst = dev.data();
  if (!dispatch2<HostGather>(ddt, p.src_dtype ? p.src_dtype : ddt, p, total, nullptr)) {
    fprintf(stderr, "gather case %d: dtype pair %d <- %d not dispatched\n", k, ddt, sdt);
    return 1;
  }
  if (memcmp(cpu.data(), dev.data(), bytes) != 0) {
    fprintf(stderr,
            "gather case %d differs: dtype %d <- %d, n %lld c %lld, src %lldx%lld at "
            "(%lld, %lld) in %lldx%lld, channels_last %d, affine %d (dtype %d)\n",
            k, ddt, sdt, (long long)p.n, (long long)p.c, (long long)p.src_h,
            (long long)p.src_w, (long long)p.off_h, (long long)p.off_w,
            (long long)p.dst_h, (long long)p.dst_w, p.channels_last, affine,
            p.affine_dtype);
    return 1;
  }
  return 0;
}

static int copy_case(int ddt, int sdt, int k) {
  sc_copy_params p = {};
  for (int i = 0; i < 4; i++) p.size[i] = pick(i == 0 ? 1 : 1, i == 1 ? 6 : 5);
  if (k % 13 == 0) p.size[next() % 4] = 0;
  p.dtype = ddt;
  p.src_dtype = sdt == ddt && next() % 2 ? 0 : sdt;
  p.accumulate = (int)(next() % 2);
  // destination: a window of a bigger dense NCHW or NHWC tensor
  const int64_t big[4] = {p.size[0] + 1, p.size[1] + 2, p.size[2] + 1, p.size[3] + 3};
  const bool dnhwc = next() % 2;
  dense_strides(big, dnhwc, p.dst_stride);
  const int64_t dcount = big[0] * big[1] * big[2] * big[3];
  const int64_t dorigin = p.dst_stride[1] + p.dst_stride[3] * (int64_t)(next() % 3);
  // source: dense of its own layout, or with a broadcast (stride 0) dim
  const int64_t sbig[4] = {p.size[0] + 1, p.size[1] + 1, p.size[2] + 2, p.size[3] + 1};
  dense_strides(sbig, next() % 2, p.src_stride);
  if (next() % 3 == 0) p.src_stride[next() % 4] = 0;
  std::vector<unsigned char> src, cpu, dev;
  fill(sdt, src, sbig[0] * sbig[1] * sbig[2] * sbig[3]);
  fill(ddt, cpu, dcount);
  dev = cpu;
  p.src = src.data() + p.src_stride[2] * dtype_bytes(sdt);
  const int64_t total = p.size[0] * p.size[1] * p.size[2] * p.size[3];
  p.dst = cpu.data() + dorigin * dtype_bytes(ddt);
  if (sc_copy_cpu(&p) != 0) {
    fprintf(stderr, "copy case %d: the CPU kernel refused it\n", k);
    return 1;
  }
  p.dst = dev.data() + dorigin * dtype_bytes(ddt);
  const sc_copy_params q = copy_walk_order(p);
  if (total && !dispatch2<HostCopy>(ddt, p.src_dtype ? p.src_dtype : ddt, q, total, nullptr)) {
    fprintf(stderr, "copy case %d: dtype pair %d <- %d not dispatched\n", k, ddt, sdt);
    return 1;
  }
  if (memcmp(cpu.data(), dev.data(), cpu.size()) != 0) {
    fprintf(stderr,
            "copy case %d differs: dtype %d <- %d, size %lldx%lldx%lldx%lld, dst %s, "
            "accumulate %d\n",
            k, ddt, sdt, (long long)p.size[0], (long long)p.size[1],
            (long long)p.size[2], (long long)p.size[3], dnhwc ? "NHWC" : "NCHW",
            p.accumulate);
    return 1;
  }
  return 0;
}

int main(void) {
  int gather_bad = 0, copy_bad = 0, cases = 0, copies = 0;
  for (int k = 0; k < 200; k++)
    for (int d = 0; d < 4; d++)
      for (int s = 0; s < 5; s++) {
        gather_bad += gather_case(kDst[d], kSrc[s], cases);
        if (kSrc[s] != SC_DTYPE_U8) {
          copy_bad += copy_case(kDst[d], kSrc[s], cases);
          copies++;
        }
        cases++;
      }
  CHECK_EQ(gather_bad, 0);
  CHECK_EQ(copy_bad, 0);
  // the walk order: a channels-last destination is walked C fastest, the
  // operation unchanged
  sc_copy_params p = {};
  const int64_t size[4] = {2, 3, 4, 5};
  memcpy(p.size, size, sizeof size);
  dense_strides(size, true, p.dst_stride);
  dense_strides(size, false, p.src_stride);
  const sc_copy_params q = copy_walk_order(p);
  CHECK_EQ(q.size[3], 3);
  CHECK_EQ(q.dst_stride[3], 1);
  CHECK_EQ(q.src_stride[3], 20);
  CHECK_EQ(q.size[1], 4);
  dense_strides(size, false, p.dst_stride);
  CHECK_EQ(copy_walk_order(p).dst_stride[3], 1);
  CHECK_EQ(copy_walk_order(p).size[1], 3);
  if (g_failures) fprintf(stderr, "%d check(s) failed\n", g_failures);
  else printf("test_tile_elem: %d gathers and %d copies bit-identical\n", cases, copies);
  return g_failures ? 1 : 0;
}
