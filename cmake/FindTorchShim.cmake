# FindTorchShim.cmake — locate PyTorch's stable C shim from a pip-installed
# torch, by asking the Python interpreter. find_package(Torch) is not needed:
# streamcnn only uses the ABI-stable C shim (headers + libtorch_cpu).
#
# Input:  Python_EXECUTABLE (or the first python3 on PATH)
# Output: TorchShim_FOUND, TorchShim_VERSION, TorchShim_INCLUDE_DIR,
#         TorchShim_LIBRARY_DIR, TorchShim_CPU_LIBRARY, TorchShim_CUDA_LIBRARY
#         (empty when torch has no CUDA), imported target TorchShim::cpu
#         (and TorchShim::cuda).

if(NOT Python_EXECUTABLE)
  find_package(Python COMPONENTS Interpreter REQUIRED)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(os.path.dirname(torch.__file__)); print(torch.__version__.split('+')[0])"
  OUTPUT_VARIABLE _ts_out
  RESULT_VARIABLE _ts_rc
  ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)

if(_ts_rc EQUAL 0)
  string(REPLACE "\n" ";" _ts_lines "${_ts_out}")
  list(GET _ts_lines 0 _ts_root)
  list(GET _ts_lines 1 TorchShim_VERSION)
  set(TorchShim_INCLUDE_DIR "${_ts_root}/include")
  set(TorchShim_LIBRARY_DIR "${_ts_root}/lib")
  find_library(TorchShim_CPU_LIBRARY torch_cpu PATHS "${TorchShim_LIBRARY_DIR}" NO_DEFAULT_PATH)
  find_library(TorchShim_CUDA_LIBRARY torch_cuda PATHS "${TorchShim_LIBRARY_DIR}" NO_DEFAULT_PATH)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(TorchShim
  REQUIRED_VARS TorchShim_CPU_LIBRARY TorchShim_INCLUDE_DIR
  VERSION_VAR TorchShim_VERSION)

if(TorchShim_FOUND AND NOT TARGET TorchShim::cpu)
  add_library(TorchShim::cpu SHARED IMPORTED)
  set_target_properties(TorchShim::cpu PROPERTIES
    IMPORTED_LOCATION "${TorchShim_CPU_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${TorchShim_INCLUDE_DIR}")
  if(TorchShim_CUDA_LIBRARY)
    add_library(TorchShim::cuda SHARED IMPORTED)
    set_target_properties(TorchShim::cuda PROPERTIES
      IMPORTED_LOCATION "${TorchShim_CUDA_LIBRARY}")
  endif()
endif()
