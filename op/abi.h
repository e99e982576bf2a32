/*
 * abi.h — the subset of PyTorch's ABI-stable C shim that streamcnn uses,
 * declared in C.
 *
 * PyTorch's own shim headers (torch/csrc/inductor/aoti_torch/c/shim.h,
 * torch/csrc/stable/c/shim.h, .../generated/c_shim_aten.h) declare an
 * extern "C" interface but are C++ headers, so a .c file cannot include
 * them. These declarations must match them exactly: tests/abi/abi_check.cpp
 * includes the real headers together with this one, and any drift in a
 * signature is a compile error of the default build.
 *
 * Only functions present in torch 2.10 (the minimum supported version) are
 * declared here.
 *
 * Ownership, as verified on torch 2.11 (see DESIGN.md):
 *   - AtenTensorHandle values returned by the shim are new references owned
 *     by the caller (release with aoti_torch_delete_tensor_object).
 *   - Every handle, list and string placed on a dispatcher stack is consumed
 *     by torch_call_dispatcher; results come back owned.
 *   - A boxed kernel owns the handles and lists it receives on its stack and
 *     returns owned handles/lists in the first stack slots.
 *   - An optional argument with a value is a pointer to a heap StableIValue
 *     that libtorch frees with C++ delete: build it with _sc_box_some()
 *     (op/boxing.cpp), never with malloc.
 */
#ifndef STREAMCNN_ABI_H
#define STREAMCNN_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct AtenTensorOpaque;
typedef struct AtenTensorOpaque *AtenTensorHandle;
typedef int32_t AOTITorchError;
typedef uint64_t StableIValue;
struct StableListOpaque;
typedef struct StableListOpaque *StableListHandle;
struct StringOpaque;
typedef struct StringOpaque *StringHandle;
struct TorchLibraryOpaque;
typedef struct TorchLibraryOpaque *TorchLibraryHandle;
struct DeviceGuardOpaque;
typedef struct DeviceGuardOpaque *DeviceGuardHandle;

#define SC_TORCH_SUCCESS 0

/* The libtorch version whose stable headers streamcnn is written against
 * (torch_call_dispatcher's extension_build_version): 2.10.0. */
#define SC_TORCH_BUILD_VERSION ((2ULL << 56) | (10ULL << 48))

/* --- dtypes, devices ---------------------------------------------------- */
int32_t aoti_torch_dtype_float32(void);
int32_t aoti_torch_dtype_float64(void);
int32_t aoti_torch_dtype_bool(void);
int32_t aoti_torch_dtype_uint8(void);
int32_t aoti_torch_dtype_float16(void);
int32_t aoti_torch_dtype_bfloat16(void);
int32_t aoti_torch_device_type_cpu(void);
int32_t aoti_torch_device_type_cuda(void);
int32_t aoti_torch_layout_strided(void);

/* --- tensor handles ----------------------------------------------------- */
AOTITorchError aoti_torch_delete_tensor_object(AtenTensorHandle tensor);
AOTITorchError aoti_torch_new_tensor_handle(AtenTensorHandle orig_handle,
                                            AtenTensorHandle *new_handle);
AOTITorchError aoti_torch_get_data_ptr(AtenTensorHandle tensor,
                                       void **ret_data_ptr);
AOTITorchError aoti_torch_get_dim(AtenTensorHandle tensor, int64_t *ret_dim);
AOTITorchError aoti_torch_get_sizes(AtenTensorHandle tensor,
                                    int64_t **ret_sizes);
AOTITorchError aoti_torch_get_strides(AtenTensorHandle tensor,
                                      int64_t **ret_strides);
AOTITorchError aoti_torch_get_dtype(AtenTensorHandle tensor,
                                    int32_t *ret_dtype);
AOTITorchError aoti_torch_get_device_type(AtenTensorHandle tensor,
                                          int32_t *ret_device_type);
AOTITorchError aoti_torch_get_device_index(AtenTensorHandle tensor,
                                           int32_t *ret_device_index);
AOTITorchError aoti_torch_get_layout(AtenTensorHandle tensor,
                                     int32_t *ret_layout);
AOTITorchError aoti_torch_is_defined(AtenTensorHandle tensor,
                                     bool *ret_is_defined);
AOTITorchError aoti_torch_is_contiguous(AtenTensorHandle tensor,
                                        bool *ret_is_contiguous);
/* A view of self's storage with the given sizes and strides, starting
 * storage_offset elements after self's own start (an increment); no bounds
 * checks (callers check), no autograd. */
AOTITorchError aoti_torch__reinterpret_tensor(AtenTensorHandle self,
                                              int64_t ndim,
                                              const int64_t *sizes_ptr,
                                              const int64_t *strides_ptr,
                                              int64_t storage_offset,
                                              AtenTensorHandle *ret_new_tensor);
AOTITorchError aoti_torch_empty_strided(int64_t ndim, const int64_t *sizes_ptr,
                                        const int64_t *strides_ptr,
                                        int32_t dtype, int32_t device_type,
                                        int32_t device_index,
                                        AtenTensorHandle *ret_new_tensor);
AOTITorchError aoti_torch_zero_(AtenTensorHandle self);

/* --- grad mode ---------------------------------------------------------- */
bool aoti_torch_grad_mode_is_enabled(void);
void aoti_torch_grad_mode_set_enabled(bool enabled);

/* --- device guard (device-generic) -------------------------------------- */
AOTITorchError aoti_torch_create_device_guard(int32_t device_index,
                                              DeviceGuardHandle *ret_guard);
AOTITorchError aoti_torch_delete_device_guard(DeviceGuardHandle guard);

/* --- errors --------------------------------------------------------------- */
/* Throws a C++ exception (RuntimeError in Python) when cond is false; the C
 * callers are compiled with -fexceptions so it unwinds through them. */
void aoti_torch_check(bool cond, const char *func, const char *file,
                      uint32_t line, const char *msg);

/* --- operator library ------------------------------------------------------ */
AOTITorchError aoti_torch_library_init_def(const char *ns, const char *file,
                                           uint32_t line,
                                           TorchLibraryHandle *ret_new_torch_lib);
AOTITorchError aoti_torch_library_init_impl(const char *ns, const char *k,
                                            const char *file, uint32_t line,
                                            TorchLibraryHandle *ret_new_torch_lib);
AOTITorchError aoti_torch_library_def(TorchLibraryHandle self,
                                      const char *schema);
AOTITorchError aoti_torch_delete_library_object(TorchLibraryHandle tlh);
AOTITorchError torch_library_impl(TorchLibraryHandle self, const char *name,
                                  void (*fn)(StableIValue *, uint64_t,
                                             uint64_t),
                                  uint64_t extension_build_version);
AOTITorchError torch_call_dispatcher(const char *opName,
                                     const char *overloadName,
                                     StableIValue *stack,
                                     uint64_t extension_build_version);

/* --- lists and strings (torch >= 2.10) ---------------------------------- */
AOTITorchError torch_new_list_reserve_size(size_t size,
                                           StableListHandle *ret);
AOTITorchError torch_list_size(StableListHandle list_handle, size_t *size);
AOTITorchError torch_list_get_item(StableListHandle list_handle, size_t index,
                                   StableIValue *element);
AOTITorchError torch_list_push_back(StableListHandle list_handle,
                                    StableIValue element);
AOTITorchError torch_delete_list(StableListHandle list_handle);
AOTITorchError torch_new_string_handle(const char *data, size_t length,
                                       StringHandle *handle);
AOTITorchError torch_delete_string(StringHandle handle);

/* --- CPU parallelism (torch >= 2.10) ------------------------------------ */
typedef void (*ParallelFunc)(int64_t begin, int64_t end, void *ctx);
AOTITorchError torch_parallel_for(int64_t begin, int64_t end,
                                  int64_t grain_size, ParallelFunc func,
                                  void *ctx);

/* --- device-generic ATen entry points with Scalar arguments ---------------
 * (generated/c_shim_aten.h). Scalars cannot cross torch_call_dispatcher in
 * 2.10/2.11, so ops that take one are called through these. */
AOTITorchError aoti_torch_aten_full(const int64_t *size, int64_t size_len_,
                                    double fill_value, int32_t *dtype,
                                    int32_t *layout, int32_t *device,
                                    int32_t device_index_,
                                    int32_t *pin_memory,
                                    AtenTensorHandle *ret0);
AOTITorchError aoti_torch_aten_subtract_Tensor(AtenTensorHandle self,
                                               AtenTensorHandle other,
                                               double alpha,
                                               AtenTensorHandle *ret0);

#ifdef SC_WITH_CUDA
/* libtorch_cuda */
AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                  void **ret_stream);
#endif

#ifdef __cplusplus
}
#endif

#endif /* STREAMCNN_ABI_H */
