#!/usr/bin/env bash
# Prepared calls for a lent GPU machine (issue 5): build for Hopper, run
# the CUDA tests, the GPU benchmark and a profile; everything lands under
# $OUT (env.txt, build.log, tests_1..3.log, bench_small.txt/.json,
# profile.txt, bench_large.txt/.json). A build without CUDA kernels stops
# the call. Stages have their own time limits so that a slow
# or failing stage still leaves the others' results; each call stays under
# the 10-minute limit of one device call. The large sizes take a second
# call (the build is reused if the machine is still warm):
#
#   device tool:  bash bench/gpu_session.sh                     (no carry needed)
#                 STAGES="build large" bash bench/gpu_session.sh
#
# Optional stage "budget" (60 s): bench/budget_check.py on CUDA.
#
# DEADLINE (seconds, default 570) bounds the whole call: each stage gets
# its own limit or what is left before the deadline, whichever is less,
# and a stage with under 20 s left is skipped (said so in the log). With
# the 15 device-minutes a drawn task has, the machine's start included:
#   call 1  DEADLINE=540 bash bench/gpu_session.sh
#   call 2  at once (the machine is still warm and keeps build/gpu):
#           STAGES="build large" LARGE_SIZES="32768 65536" DEADLINE=<what
#           status says is left, minus 60> bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/streamcnn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${STAGES:-"build tests small profile"}
LARGE_SIZES=${LARGE_SIZES:-"16384 32768 65536"}
DEADLINE=${DEADLINE:-570}
T0=$SECONDS
stage() { echo "== $(date +%T) +$((SECONDS - T0))s $*"; }
want() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
# limit N: the seconds a stage may run (N, or what is left before the
# deadline less 5 s); fails when under 20 s are left
limit() {
  local left=$((DEADLINE - (SECONDS - T0) - 5))
  if [ "$left" -lt 20 ]; then echo "skipped: ${left}s left before DEADLINE=$DEADLINE" >&2; return 1; fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

stage env
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)'
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if ! timeout "$(limit 150 || echo 1)" bash -c "cmake -S . -B build/gpu -G Ninja -DSTREAMCNN_TESTS=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER=$NVCC -DSTREAMCNN_CUDA=ON \
      -DPython_EXECUTABLE=$(command -v "$PY") &&
    cmake --build build/gpu" > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
fi
grep -i "CUDA kernels\|slide reading" "$OUT/build.log"
# a build that fell back to the CPU would fail every test and time the CPU
if ! grep -q "CUDA kernels ON" "$OUT/build.log"; then
  echo "the build has no CUDA kernels (nvcc: $NVCC); stopping"; exit 1
fi
export STREAMCNN_LIBRARY=$PWD/build/gpu/libstreamcnn.so PYTHONPATH=$PWD/python

if want tests; then
stage tests
# every test with a CUDA case (test_cuda.py, the host-image tests, the CUDA
# parameters of the equivalence, amp and budget tests), in three processes
# so that a sticky CUDA error (an illegal address) cannot poison the rest:
# the kernels bit for bit against the CPU first, then the host images, then
# the others; no -x (one failure must not hide the rest), -v and a per-test
# timeout (pytest-timeout, in the device image) so that a hang still
# leaves the names of what passed
PT=(-p no:cacheprovider -v -rfE --durations=15)
"$PY" -c "import pytest_timeout" 2>/dev/null && PT+=(-p timeout --timeout=90)
run_tests() {  # N CAP PYTEST-ARGS...: one pytest process, log tests_N.log
  local n=$1 cap=$2 t
  shift 2
  if t=$(limit "$cap"); then
    timeout "$t" "$PY" -m pytest "${PT[@]}" "$@" > "$OUT/tests_$n.log" 2>&1
    echo "tests $n rc=$? ($*)"
    grep -E "passed|failed|error|skipped|no tests ran" "$OUT/tests_$n.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests_$n.log" | head -20
  fi
}
run_tests 1 90 tests/python/test_cuda.py -k "gather_bit_identical or scatter_add_bit_identical"
run_tests 2 90 tests/python/test_host_image.py
run_tests 3 150 tests/python --ignore=tests/python/test_host_image.py \
  -k "cuda and not gather_bit_identical and not scatter_add_bit_identical"
fi

if want small; then
stage bench small
if t=$(limit 120); then
timeout "$t" "$PY" bench/gpu_resnet34.py --sizes 2048 4096 8192 --tile 1920 --reps 3 --cone \
  --out "$OUT/bench_small.json" > "$OUT/bench_small.txt" 2>&1
echo "rc=$?"; cat "$OUT/bench_small.txt"
fi
fi

if want profile; then
stage profile 8192
if t=$(limit 90); then
timeout "$t" "$PY" bench/gpu_profile.py --size 8192 --tile 1920 --top 25 \
  > "$OUT/profile.txt" 2>&1
echo "rc=$?"; grep -E "^#|^## |^device time|^\|" "$OUT/profile.txt"
fi
fi

if want budget; then
stage budget
# memory_budget on random stems: measured peaks (max_memory_allocated, so
# with cuDNN's workspace) against budget + output + gradient
if t=$(limit 60); then
timeout "$t" "$PY" bench/budget_check.py --device cuda --seeds 60 --start 1000 \
  > "$OUT/budget.txt" 2>&1
echo "rc=$?"; grep -v "^\[W" "$OUT/budget.txt"
fi
fi

if want large; then
stage bench large: $LARGE_SIZES
# shellcheck disable=SC2086
if t=$(limit 420); then
timeout "$t" "$PY" bench/gpu_resnet34.py --sizes $LARGE_SIZES --tile 2880 --reps 1 \
  --out "$OUT/bench_large.json" > "$OUT/bench_large.txt" 2>&1
echo "rc=$?"; cat "$OUT/bench_large.txt"
fi
fi
stage done
