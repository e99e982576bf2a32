#!/usr/bin/env bash
# make sanitize: the library and the C tests built with ASan + UBSan
# (build/asan, any undefined behaviour fatal), ctest, then a focused pytest
# subset with the sanitizer runtime preloaded into Python. Zero findings
# expected: any ASan or UBSan report fails the run.
#
# Usage: .ci/sanitize.sh PYTHON [pytest files or -k ... to override the subset]
#
# Settings, and why:
#   LD_PRELOAD=libasan.so libstdc++.so  ASan must be the first runtime in
#       the process (python is not built with it; our library, loaded later,
#       is); libstdc++ with it, else libtorch's own C++ exceptions abort in
#       ASan's __cxa_throw interceptor ("CHECK failed ... real___cxa_throw").
#   ASAN_OPTIONS (Python):
#       detect_leaks=0   LeakSanitizer would report libtorch's and CPython's
#                        never-freed globals by the thousand at exit; our
#                        handles are leak-checked by tests/python/test_leaks.py
#                        and by ctest below (detect_leaks=1, no torch) and
#                        valgrind (make valgrind).
#       halt_on_error=1, abort_on_error=0  the first report ends the test
#                        run with a non-zero exit status.
#       quarantine_size_mb=8  freed memory is held back (poisoned) before
#                        reuse, so a use after free is caught; ASan's default
#                        256 MB (and 64) made the RSS-based leak tests
#                        (test_slide's open/close loop: +37 MB) fail; 8 MB
#                        keeps a short quarantine below their 30 MB bound.
#       allocator_may_return_null=1  an impossible allocation (the
#                        out-of-memory tests) returns NULL as it would
#                        without ASan, instead of ASan aborting.
#   UBSAN_OPTIONS: print_stacktrace=1, halt_on_error=1 (the build also has
#       -fno-sanitize-recover=undefined).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: sanitize.sh PYTHON [pytest args]}
shift
BUILD=build/asan
cmake -S . -B "$BUILD" -G Ninja -DSTREAMCNN_TESTS=ON -DSTREAMCNN_CUDA=OFF \
  -DSTREAMCNN_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE="$PY"
cmake --build "$BUILD"
ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$BUILD" --output-on-failure

if (($# == 0)); then
  # the harness check, ops, bad inputs, halo cache, equivalence (small
  # images), slides, threads, huge sizes, out-of-memory, the sparse
  # backward, row bands (tile-parallel), heatmaps and channel cats
  set -- tests/python/test_sanitizer.py tests/python/test_ops.py tests/python/test_bad_inputs.py \
    tests/python/test_halo_cache.py tests/python/test_equivalence.py \
    tests/python/test_slide.py tests/python/test_threads.py \
    tests/python/test_overflow.py tests/python/test_oom.py \
    tests/python/test_sparse_backward.py tests/python/test_tile_parallel.py \
    tests/python/test_heatmaps.py tests/python/test_cat.py
fi
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0:quarantine_size_mb=8:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$PWD/python" STREAMCNN_LIBRARY="$PWD/$BUILD/libstreamcnn.so"
"$PY" -m pytest -q -p no:cacheprovider "$@"
