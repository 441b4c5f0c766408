#!/usr/bin/env bash
# One-time (and idempotent) set-up on Debian 12 as root, no GPU needed:
#   1. the Debian packages the build needs,
#   2. .venv with LibTorch (the torch==2.13.0 CPU wheel) and the Python test oracles,
#   3. a CMake + Ninja build in build/.
# Re-running it only does what is missing, then an incremental build.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ cmake ninja-build ccache pkg-config libboost-dev libtomlplusplus-dev
          nlohmann-json3-dev libgtest-dev libgmock-dev libpcre2-dev libfmt-dev
          clang libclang-rt-14-dev)  # clang + libFuzzer: scripts/fuzz.sh, ctest -L fuzz
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv .venv
fi
# torch is pinned exactly (scripts/requirements-oracles.txt): the CPU wheel on disk, not a
# multi-GB CUDA download.
if ! .venv/bin/python - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {}
for line in open("scripts/requirements-oracles.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, ver = line.split("==")
        want[name] = ver
for name, ver in want.items():
    if md.version(name).split("+")[0] != ver:
        sys.exit(1)
PY
then
  echo "setup: installing Python packages into .venv (torch==2.13.0 CPU, oracles)"
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-oracles.txt
fi

jobs=$(nproc)
if [[ ! -f build/build.ninja ]]; then
  cmake -S . -B build -G Ninja -DPEFTFW_PYTHON="$PWD/.venv/bin/python"
fi
echo "setup: building (this takes a while the first time on 2 cores)"
cmake --build build -j"$jobs"
echo "setup: done. The executable is build/bin/peftfw"
