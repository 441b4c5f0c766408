#!/usr/bin/env bash
# Downloads the Debian packages the GPU machine lacks (toml++, PCRE2 headers) into .deps/
# (git-ignored), for scripts/device_build.sh. Run on a Debian 12 machine with apt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps && cd .deps
apt-get download libtomlplusplus-dev libtomlplusplus3 libpcre2-dev libpcre2-8-0 libpcre2-16-0 \
  libpcre2-32-0 libpcre2-posix3
