#!/usr/bin/env bash
# make fuzz: build the libFuzzer targets of tests/fuzz with clang
# (build/fuzz, ASan + UBSan) and run each for FUZZ_SECONDS seconds, from
# the committed seeds (tests/fuzz/corpus/<target>), the past findings
# (tests/fuzz/regress/<target>) and the inputs earlier runs kept
# (build/fuzz/corpus/<target>). A crash, leak, timeout or broken invariant
# fails the run and leaves the input in build/fuzz/artifacts/: minimise it
# (fuzz_<target> -minimize_crash=1 FILE), fix the bug, and commit the input
# to tests/fuzz/regress/<target>/ (ctest runs it from then on).
#
# Usage: .ci/fuzz.sh PYTHON SECONDS [targets...]   (default: all five)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: fuzz.sh PYTHON SECONDS [targets]}
SECONDS_EACH=${2:?usage: fuzz.sh PYTHON SECONDS [targets]}
shift 2
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(program geometry memory slide resample)
BUILD=build/fuzz
if ! command -v clang >/dev/null; then
  echo "fuzz: needs clang (libFuzzer); Debian: apt-get install clang" >&2
  exit 2
fi
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DSTREAMCNN_FUZZ=ON -DSTREAMCNN_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$PY" >/dev/null
cmake --build "$BUILD" --target "${TARGETS[@]/#/fuzz_}"
mkdir -p "$BUILD/artifacts"
fail=0
for t in "${TARGETS[@]}"; do
  mkdir -p "$BUILD/corpus/$t"
  # slide inputs are whole TIFF files; the others are programs, or a
  # resample header and pixel bytes (< 8 KB)
  max_len=8192
  [ "$t" = slide ] && max_len=65536
  echo "fuzz: $t for ${SECONDS_EACH}s"
  if ! ASAN_OPTIONS=detect_leaks=1 "$BUILD/fuzz_$t" -max_total_time="$SECONDS_EACH" \
      -timeout=20 -rss_limit_mb=2048 -max_len=$max_len -print_final_stats=1 \
      -artifact_prefix="$BUILD/artifacts/$t-" "$BUILD/corpus/$t" \
      "tests/fuzz/corpus/$t" $( [ -d "tests/fuzz/regress/$t" ] && echo "tests/fuzz/regress/$t") \
      > "$BUILD/fuzz_$t.log" 2>&1; then
    echo "fuzz: $t FAILED (log $BUILD/fuzz_$t.log):" >&2
    grep -E "ERROR|invariant broken|SUMMARY|Test unit written" "$BUILD/fuzz_$t.log" >&2 || true
    fail=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$BUILD/fuzz_$t.log" || true
done
exit $fail
