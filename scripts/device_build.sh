#!/usr/bin/env bash
# Build and test on a machine that has a CUDA LibTorch in python3 but no network and no
# apt (the lent GPU machine). Debian packages it lacks travel as .deb files in .deps/
# (made on a Debian machine by scripts/fetch_device_deps.sh) and are unpacked under /tmp.
#   scripts/device_build.sh [BUILD_DIR]        logs go to $OUT when set
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
out=${OUT:-$build}
mkdir -p "$out"
if compgen -G ".deps/*.deb" >/dev/null; then
  for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
  sed -i 's|^prefix=/usr|prefix=/tmp/deps/usr|' /tmp/deps/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
  export PKG_CONFIG_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu/pkgconfig
  export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export CPATH=/tmp/deps/usr/include${CPATH:+:$CPATH}
fi
cmake -S . -B "$build" -G Ninja -DPEFTFW_PYTHON="$(command -v python3)" > "$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build "$build" -j"$(nproc)" > "$out/build.log" 2>&1 || { grep -m5 -B2 -A8 "error" "$out/build.log"; exit 1; }
echo "build ok"
