#!/usr/bin/env bash
# make valgrind: every ctest test of a plain (unsanitized) build run under
# valgrind memcheck; any error or leak fails. The commands come from ctest
# itself (--show-only=json-v1), so new C tests are covered without edits.
#
# Usage: .ci/valgrind.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:?usage: valgrind.sh BUILD_DIR}
if ! command -v valgrind >/dev/null; then
  echo "valgrind: not installed (Debian: apt-get install valgrind)" >&2
  exit 2
fi
ctest --test-dir "$BUILD" --show-only=json-v1 > "$BUILD/ctest.json"
python3 - "$BUILD/ctest.json" > "$BUILD/valgrind.cmds" <<'PY'
import json, shlex, sys
for t in json.load(open(sys.argv[1]))["tests"]:
    print(t["name"], " ".join(shlex.quote(a) for a in t["command"]))
PY
fail=0
while read -r name cmd; do
  log="$BUILD/valgrind_$name.log"
  if eval valgrind -q --error-exitcode=1 --leak-check=full \
      --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
      --track-origins=yes "$cmd" > "$log" 2>&1; then
    echo "valgrind: $name clean"
  else
    echo "valgrind: $name FAILED ($log)" >&2
    tail -30 "$log" >&2
    fail=1
  fi
done < "$BUILD/valgrind.cmds"
exit $fail
