#!/usr/bin/env bash
# libFuzzer targets for peftfw's parsers (tests/fuzz/): clang with AddressSanitizer and
# UndefinedBehaviorSanitizer, in a build folder of their own ($PEFTFW_FUZZ_BUILD, default
# build-fuzz/), apart from the main g++ build.
#
#   scripts/fuzz.sh build                      configure and build every target
#   scripts/fuzz.sh list                       the targets
#   scripts/fuzz.sh TARGET [libFuzzer flags]   build, then fuzz TARGET on its corpus, e.g.
#     scripts/fuzz.sh recipe -runs=1000000
#     scripts/fuzz.sh safetensors -max_total_time=30
#
# The seeds in tests/fuzz/corpus/TARGET/ are read, never written: inputs the fuzzer finds go to
# BUILD/corpus/TARGET/, a crashing input to BUILD/artifacts/TARGET/ (reproduce it with
# BUILD/bin/fuzz_TARGET FILE). The last line says how many inputs ran, in how long, on which
# machine; the exit status is libFuzzer's (0: nothing found).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${PEFTFW_FUZZ_BUILD:-build-fuzz}
targets=(safetensors recipe jsonl tokenizer config_json adapter_config)

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  echo "targets: ${targets[*]}"
}

build_all() {
  if ! command -v clang++ >/dev/null; then
    echo "fuzz.sh: clang++ not found; install clang and libclang-rt-14-dev (scripts/setup.sh does)" >&2
    exit 2
  fi
  if [[ ! -f $build/build.ninja ]]; then
    # No CMAKE_BUILD_TYPE: tests/fuzz/CMakeLists.txt sets -O1 and the sanitizers itself.
    cmake -S tests/fuzz -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ >/dev/null
  fi
  # At most two jobs: the machines this runs on have two cores, shared with the main build.
  cmake --build "$build" -j2
  python3 tests/fuzz/make_safetensors_seeds.py "$build/seeds/safetensors"
}

machine() {
  local cpu
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
  echo "${cpu:-unknown CPU}, $(nproc) cores"
}

run_target() {
  local target=$1
  shift
  # The seeds: the target's folder, generated files for safetensors, the shipped recipes too.
  local seeds=(tests/fuzz/corpus/"$target")
  case $target in
    safetensors) seeds=("$build/seeds/safetensors") ;;
    recipe) seeds+=(recipes) ;;
  esac
  local dict="$build/dict/$target.dict"
  mkdir -p "$build/corpus/$target" "$build/artifacts/$target" "$build/dict" "$build/logs"
  if [[ $target == recipe ]]; then
    cp tests/fuzz/dict/recipe.dict "$dict"
  else
    cat tests/fuzz/dict/json.dict tests/fuzz/dict/"$target".dict >"$dict"
  fi
  local log="$build/logs/$target.log"
  echo "fuzz.sh: fuzz_$target $* on $(machine); log: $log"
  local start end rc
  start=$(date +%s)
  set +e
  # -timeout: an input taking 10 s is a finding (the default is 20 minutes);
  # -rss_limit_mb: so is one needing more than 2 GB.
  "$build/bin/fuzz_$target" -dict="$dict" -artifact_prefix="$build/artifacts/$target/" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$@" \
    "$build/corpus/$target" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  set -e
  end=$(date +%s)
  local runs
  runs=$(sed -n 's/^stat::number_of_executed_units: //p' "$log" | tail -1)
  if ((rc != 0)); then
    tail -n 60 "$log"
    echo "fuzz.sh: fuzz_$target FOUND A PROBLEM (exit $rc); the input is in $build/artifacts/$target/"
  else
    grep -E '^(#[0-9]+ *(INITED|DONE)|Done [0-9]+ runs)' "$log" | tail -3
  fi
  echo "fuzz.sh: fuzz_$target: ${runs:-?} executions in $((end - start)) s on $(machine), exit $rc"
  return "$rc"
}

case ${1:-} in
  "" | -h | --help) usage ;;
  list) printf '%s\n' "${targets[@]}" ;;
  build) build_all ;;
  *)
    target=$1
    shift
    if [[ " ${targets[*]} " != *" $target "* ]]; then
      echo "fuzz.sh: unknown target '$target'; the targets are: ${targets[*]}" >&2
      exit 2
    fi
    build_all >"${TMPDIR:-/tmp}/peftfw-fuzz-build.$$.log" 2>&1 || {
      cat "${TMPDIR:-/tmp}/peftfw-fuzz-build.$$.log"
      exit 2
    }
    rm -f "${TMPDIR:-/tmp}/peftfw-fuzz-build.$$.log"
    run_target "$target" "$@"
    ;;
esac
