// tile.cu — CUDA tile kernels (see kernels/tile.h); same semantics and the
// same validation, in the same order, as kernels/cpu/tile.c. Launched on
// the caller's current stream; never synchronises.
#include "tile.h"
#include "tile_elem.cuh"

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

using namespace sc_tile;

constexpr int kThreads = 256;

// Enough blocks to fill the device; the grid-stride loops cover the rest.
unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return (unsigned)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

template <typename T, typename S>
__global__ void sc_copy_kernel(sc_copy_params p, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x)
    copy_elem<T, S>(p, i);
}

template <typename T, typename S>
__global__ void sc_gather_kernel(sc_gather_params p, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x)
    gather_elem<T, S>(p, i);
}

struct CopyLaunch {
  template <typename T, typename S>
  static void go(const sc_copy_params &p, int64_t total, cudaStream_t s) {
    sc_copy_kernel<T, S><<<blocks_for(total), kThreads, 0, s>>>(p, total);
  }
};

struct GatherLaunch {
  template <typename T, typename S>
  static void go(const sc_gather_params &p, int64_t total, cudaStream_t s) {
    sc_gather_kernel<T, S><<<blocks_for(total), kThreads, 0, s>>>(p, total);
  }
};

}  // namespace

extern "C" int sc_copy_cuda(const sc_copy_params *p, void *stream, char *err,
                            size_t errlen) {
  const char *bad = sc_copy_check(p);
  if (bad) return fail_msg(err, errlen, bad);
  const int64_t total = p->size[0] * p->size[1] * p->size[2] * p->size[3];
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const sc_copy_params q = copy_walk_order(*p);
  if (!dispatch2<CopyLaunch>(p->dtype, p->src_dtype ? p->src_dtype : p->dtype, q,
                             total, s))
    return fail_msg(err, errlen, "tile copy: unsupported dtype pair");
  SC_CUDA_CHECK(cudaGetLastError());
  return 0;
}

extern "C" int sc_prefetch_open(sc_prefetch *f, char *err, size_t errlen) {
  cudaStream_t s = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  f->stream = f->ready = f->done = nullptr;
  SC_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  f->stream = s;
  SC_CUDA_CHECK(cudaEventCreateWithFlags(&a, cudaEventDisableTiming));
  f->ready = a;
  SC_CUDA_CHECK(cudaEventCreateWithFlags(&b, cudaEventDisableTiming));
  f->done = b;
  return 0;
}

extern "C" void sc_prefetch_close(sc_prefetch *f) {
  if (f->stream) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(f->stream));
    cudaStreamDestroy(static_cast<cudaStream_t>(f->stream));
  }
  if (f->ready) cudaEventDestroy(static_cast<cudaEvent_t>(f->ready));
  if (f->done) cudaEventDestroy(static_cast<cudaEvent_t>(f->done));
  (void)cudaGetLastError();
  f->stream = f->ready = f->done = nullptr;
}

extern "C" int sc_prefetch_copy(sc_prefetch *f, void *main_stream, void *dst,
                                const void *image, const sc_region_copy *rc,
                                char *err, size_t errlen) {
  cudaStream_t side = static_cast<cudaStream_t>(f->stream);
  const char *src = static_cast<const char *>(image) + rc->offset;
  SC_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(f->ready),
                                static_cast<cudaStream_t>(main_stream)));
  SC_CUDA_CHECK(cudaStreamWaitEvent(side, static_cast<cudaEvent_t>(f->ready), 0));
  for (int64_t i = 0; i < rc->planes; i++)
    SC_CUDA_CHECK(cudaMemcpy2DAsync(
        static_cast<char *>(dst) + i * rc->rows * rc->row_bytes,
        (size_t)rc->row_bytes, src + i * rc->src_plane, (size_t)rc->src_pitch,
        (size_t)rc->row_bytes, (size_t)rc->rows, cudaMemcpyHostToDevice, side));
  SC_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(f->done), side));
  return 0;
}

extern "C" int sc_prefetch_wait(sc_prefetch *f, void *main_stream, char *err,
                                size_t errlen) {
  SC_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(main_stream),
                                    static_cast<cudaEvent_t>(f->done), 0));
  return 0;
}

extern "C" int sc_host_reads_mark(void **event, void *stream, char *err,
                                  size_t errlen) {
  if (!*event) {
    cudaEvent_t e = nullptr;
    SC_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    *event = e;
  }
  SC_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(*event),
                                static_cast<cudaStream_t>(stream)));
  return 0;
}

extern "C" void sc_host_reads_wait(void **event) {
  if (!*event) return;
  cudaEventSynchronize(static_cast<cudaEvent_t>(*event));
  cudaEventDestroy(static_cast<cudaEvent_t>(*event));
  (void)cudaGetLastError();
  *event = nullptr;
}

extern "C" int sc_cuda_host_mapped(const void *p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError(); /* not a CUDA pointer: pageable memory */
    return 0;
  }
  return attr.type == cudaMemoryTypeHost && attr.devicePointer == p;
}

extern "C" int sc_gather_cuda(const sc_gather_params *p, void *stream,
                              char *err, size_t errlen) {
  const char *bad = sc_gather_check(p);
  if (bad) return fail_msg(err, errlen, bad);
  const int64_t total = p->n * p->c * p->dst_h * p->dst_w;
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (!dispatch2<GatherLaunch>(p->dtype, p->src_dtype ? p->src_dtype : p->dtype,
                               *p, total, s))
    return fail_msg(err, errlen, "tile gather: unsupported dtype pair");
  SC_CUDA_CHECK(cudaGetLastError());
  return 0;
}
