#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) or an existing dev box:
# missing Debian packages via apt-get, then .venv with the pinned Python
# packages. Idempotent; `make` calls it only when requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have python3 || need+=(python3)
have python3 && python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
have cmake || need+=(cmake)
have ninja || need+=(ninja-build)
have gcc || need+=(gcc)
have g++ || need+=(g++)
have make || need+=(make)
# whole-slide reading (optional for the build, needed by its tests)
for pkg in libopenslide-dev libtiff-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  else
    echo "setup: missing ${need[*]}; install them with apt-get as root" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -c 'import torch; print("setup: torch", torch.__version__)'
