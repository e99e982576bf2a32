// abi_check.cpp — compile-only check that op/abi.h (our C declarations of
// PyTorch's stable shim) matches the real headers. Declaring an extern "C"
// function twice with different signatures is a C++ error, and the typedefs
// must name the same types, so any drift fails the default build.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_aten.h>
#include <torch/csrc/stable/c/shim.h>

#include "abi.h"

#include <type_traits>

static_assert(std::is_same_v<StableIValue, uint64_t>);
static_assert(std::is_same_v<AOTITorchError, int32_t>);
static_assert(std::is_same_v<AtenTensorHandle, AtenTensorOpaque *>);
static_assert(std::is_same_v<StableListHandle, StableListOpaque *>);
static_assert(std::is_same_v<StringHandle, StringOpaque *>);
static_assert(std::is_same_v<DeviceGuardHandle, DeviceGuardOpaque *>);

// The function types we call through, spelled out once more.
static_assert(std::is_same_v<decltype(&torch_call_dispatcher),
                             AOTITorchError (*)(const char *, const char *,
                                                StableIValue *, uint64_t)>);
static_assert(std::is_same_v<decltype(&torch_library_impl),
                             AOTITorchError (*)(TorchLibraryHandle,
                                                const char *,
                                                void (*)(StableIValue *,
                                                         uint64_t, uint64_t),
                                                uint64_t)>);
static_assert(SC_TORCH_BUILD_VERSION <= TORCH_ABI_VERSION,
              "streamcnn targets the 2.10 stable ABI; build against torch >= 2.10");
