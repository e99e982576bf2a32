#!/usr/bin/env bash
# Stable-ABI portability check (slow, opt-in: `make abi-check`): build
# libstreamcnn once against the oldest supported torch (2.10.0, in a
# throw-away venv under build/abi), then run the equivalence, operator,
# bad-input and TorchScript tests with that same binary under torch 2.10
# and under the project's torch (2.11, .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=build/abi/venv210
if [ ! -x "$OLD/bin/python" ]; then
  python3 -m venv "$OLD"
  "$OLD/bin/python" -m pip install -q torch==2.10.0 torchvision==0.25.0 pytest numpy
fi
cmake -S . -B build/abi/build210 -G Ninja -DPython_EXECUTABLE="$PWD/$OLD/bin/python"
cmake --build build/abi/build210
LIB="$PWD/build/abi/build210/libstreamcnn.so"
TESTS="tests/python/test_equivalence.py tests/python/test_models.py tests/python/test_ops.py tests/python/test_bad_inputs.py tests/python/test_torchscript.py tests/python/test_halo_cache.py"
for py in "$OLD/bin/python" .venv/bin/python; do
  echo "== $("$py" -c 'import torch; print("torch", torch.__version__)') with $LIB"
  PYTHONPATH=python STREAMCNN_LIBRARY="$LIB" "$py" -m pytest -q -p no:cacheprovider $TESTS
done
