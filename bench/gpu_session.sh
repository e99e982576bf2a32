#!/usr/bin/env bash
# Prepared calls for a lent GPU machine (issue 5): build for Hopper, run
# the CUDA tests, the GPU benchmark and a profile; everything lands under
# $OUT (env.txt, build.log, tests.log, bench_small.txt/.json, profile.txt,
# bench_large.txt/.json). Stages have their own time limits so that a slow
# or failing stage still leaves the others' results; each call stays under
# the 10-minute limit of one device call. The large sizes take a second
# call (the build is reused if the machine is still warm):
#
#   device tool:  bash bench/gpu_session.sh                     (no carry needed)
#                 STAGES="build large" bash bench/gpu_session.sh
#
# Optional stage "budget" (60 s): bench/budget_check.py on CUDA.
set -uo pipefail
OUT=${OUT:-/tmp/streamcnn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${STAGES:-"build tests small profile"}
LARGE_SIZES=${LARGE_SIZES:-"16384 32768 65536"}
stage() { echo "== $(date +%T) $*"; }
want() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

stage env
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)'
  nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build
if ! timeout 150 bash -c "cmake -S . -B build/gpu -G Ninja -DSTREAMCNN_TESTS=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DPython_EXECUTABLE=$(command -v "$PY") &&
    cmake --build build/gpu" > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
fi
grep -i "CUDA kernels" "$OUT/build.log"
export STREAMCNN_LIBRARY=$PWD/build/gpu/libstreamcnn.so PYTHONPATH=$PWD/python

if want tests; then
stage tests
# every test with a CUDA case (test_cuda.py, the host-image tests, the CUDA
# parameters of the equivalence and budget tests); no -x: one failure must
# not hide the rest
timeout 150 "$PY" -m pytest -q -rA -p no:cacheprovider tests/python -k "cuda or host_image" \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|autocast|Error" "$OUT/tests.log" | tail -12
fi

if want small; then
stage bench small
timeout 120 "$PY" bench/gpu_resnet34.py --sizes 2048 4096 8192 --tile 1920 --reps 3 --cone \
  --out "$OUT/bench_small.json" > "$OUT/bench_small.txt" 2>&1
echo "rc=$?"; cat "$OUT/bench_small.txt"
fi

if want profile; then
stage profile 8192
timeout 90 "$PY" bench/gpu_profile.py --size 8192 --tile 1920 --top 25 \
  > "$OUT/profile.txt" 2>&1
echo "rc=$?"; grep -E "^#|^## |^device time|^\|" "$OUT/profile.txt"
fi

if want budget; then
stage budget
# memory_budget on random stems: measured peaks (max_memory_allocated, so
# with cuDNN's workspace) against budget + output + gradient
timeout 60 "$PY" bench/budget_check.py --device cuda --seeds 60 --start 1000 \
  > "$OUT/budget.txt" 2>&1
echo "rc=$?"; cat "$OUT/budget.txt" | grep -v "^\[W"
fi

if want large; then
stage bench large: $LARGE_SIZES
# shellcheck disable=SC2086
timeout 420 "$PY" bench/gpu_resnet34.py --sizes $LARGE_SIZES --tile 2880 --reps 1 \
  --out "$OUT/bench_large.json" > "$OUT/bench_large.txt" 2>&1
echo "rc=$?"; cat "$OUT/bench_large.txt"
fi
stage done
