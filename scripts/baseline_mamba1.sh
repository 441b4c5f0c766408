#!/usr/bin/env bash
# Builds the Python stack's Mamba-1 CUDA kernels for the side-by-side baseline (bench/mamba1_baseline.py):
# mamba_ssm's selective_scan_cuda and causal-conv1d's causal_conv1d_cuda, for sm_90 only. The sources are
# third-party code that lives in the git-ignored .baseline/ folder and is never committed; this script only
# copies and trims them there.
#
#   scripts/baseline_mamba1.sh prepare MAMBA_GIT_DIR CAUSAL_CONV1D_GIT_DIR   (here: fill .baseline/ from git mirrors)
#   scripts/baseline_mamba1.sh [build]                                      (device: build, from the repo root)
#
# Layout of .baseline/ (made by `prepare`):
#   mamba/          mamba_ssm (python package, __init__ reduced to its version) + csrc/selective_scan + setup.py
#   causal-conv1d/  the causal-conv1d tree (no tests/CI)
#   wheels/         the ninja wheel
# `build` writes .baseline/src-<mode>/ (patched copies), .baseline/build/<ext>/<ext>.so and .baseline/build/STATUS.
# bench/mamba1_baseline.py puts these folders on sys.path itself.
#
# MAMBA1_BUILD picks what gets compiled (both compile the same kernel code for the inputs the baseline uses):
#   lean (default)  bf16 inputs with fp32 real A only; the selective scan only for seqlen > 1024 with variable
#                   B/C, z and delta_softplus (the template instances Mamba-1 training runs at L = 2048 / 8192);
#                   causal-conv1d only width 4, bf16 weights, silu, no seq_idx / final states, not deterministic
#                   (both layouts). Any other input raises an error naming the condition instead of computing.
#                   4 scan kernels + 9 conv kernels (a full upstream build: 1440 + 1242).
#   bf16            bf16 inputs / fp32 real A (scan) and bf16 weights (conv) only, every other switch as upstream.
# MAX_JOBS (default 12) caps ninja's parallel compiles; builds log to /tmp and the tails land on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bl=$root/.baseline
mode=${MAMBA1_BUILD:-lean}

if [ "${1:-build}" = prepare ]; then
  mamba_git=${2:?mamba git dir}; cc_git=${3:?causal-conv1d git dir}
  grep -qx '/.baseline/' .git/info/exclude 2>/dev/null || echo '/.baseline/' >> .git/info/exclude
  rm -rf "$bl/mamba" "$bl/causal-conv1d"
  mkdir -p "$bl/mamba" "$bl/causal-conv1d" "$bl/wheels"
  git -C "$mamba_git" archive HEAD mamba_ssm csrc/selective_scan setup.py pyproject.toml LICENSE AUTHORS \
    | tar -x -C "$bl/mamba"
  git -C "$cc_git" archive HEAD | tar -x -C "$bl/causal-conv1d"
  rm -rf "$bl/causal-conv1d/tests" "$bl/causal-conv1d/.github"
  # The upstream __init__ imports Mamba-2/3 modules (TileLang, CuTe) the device lacks; transformers and the
  # bench import the submodules they need directly.
  v=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$bl/mamba/mamba_ssm/__init__.py")
  echo "__version__ = \"$v\"" > "$bl/mamba/mamba_ssm/__init__.py"
  ls "$bl"/wheels/ninja-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: ninja -d "$bl/wheels"
  echo "mamba $(git -C "$mamba_git" rev-parse HEAD), causal-conv1d $(git -C "$cc_git" rev-parse HEAD)" > "$bl/SOURCES"
  du -sh "$bl"
  exit 0
fi

[ -d "$bl/mamba/csrc/selective_scan" ] && [ -d "$bl/causal-conv1d/csrc" ] || {
  echo "BASELINE BUILD FAILED: .baseline/ is not prepared (carry it; see the header of $0)"; exit 1; }
case $mode in lean|bf16) ;; *) echo "MAMBA1_BUILD must be lean or bf16, not '$mode'"; exit 2 ;; esac
t0=$(date +%s)
# torch's extension builder runs `ninja` from PATH: the python3's own bin folder first, else the carried wheel.
export PATH="$(dirname "$(python3 -c 'import sys; print(sys.executable)')"):$PATH"
if ! ninja --version > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps "$bl"/wheels/ninja-*.whl > /tmp/bl_ninja.log 2>&1 \
    || { echo "BASELINE BUILD FAILED: no ninja, and the wheel did not install:"; tail -3 /tmp/bl_ninja.log; exit 1; }
  hash -r
  ninja --version > /dev/null 2>&1 || { echo "BASELINE BUILD FAILED: no ninja after installing the wheel"; exit 1; }
fi

src=$bl/src-$mode
rm -rf "$src" "$bl/build"
mkdir -p "$src" "$bl/build"
cp -r "$bl/mamba/csrc/selective_scan" "$src/selective_scan"
cp -r "$bl/causal-conv1d/csrc" "$src/causal_conv1d"
ss=$src/selective_scan
cc=$src/causal_conv1d
fail=0
check() {  # check FILE PATTERN EXPECTED_COUNT: a trim that did not apply is an error, not a bigger build
  local n
  n=$(grep -c -- "$2" "$1")
  if [ "$n" != "$3" ]; then echo "patch check failed: $(basename "$1") has $n lines matching '$2', expected $3"; fail=1; fi
}

# --- dispatch: bf16 inputs only (and fp32 real A for the scan, bf16 weights for the conv) -------------------
cat > "$ss/peftfw_dispatch.h" <<'EOF'
// Written by peftfw's scripts/baseline_mamba1.sh: the baseline build compiles bf16 inputs with real fp32 A only.
#undef DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16
#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                                   \
    if (ITYPE == at::ScalarType::BFloat16) { using input_t = at::BFloat16; __VA_ARGS__(); }        \
    else { AT_ERROR(#NAME, " (peftfw baseline build): bf16 inputs only, got '", toString(ITYPE), "'"); }
#undef DISPATCH_WTYPE_FLOAT_AND_COMPLEX
#define DISPATCH_WTYPE_FLOAT_AND_COMPLEX(WTYPE, NAME, ...)                                         \
    if (WTYPE == at::ScalarType::Float) { using weight_t = float; __VA_ARGS__(); }                 \
    else { AT_ERROR(#NAME, " (peftfw baseline build): real fp32 A only, got '", toString(WTYPE), "'"); }
EOF
cat > "$cc/peftfw_dispatch.h" <<'EOF'
// Written by peftfw's scripts/baseline_mamba1.sh: the baseline build compiles bf16 inputs and weights only.
#undef DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16
#define DISPATCH_ITYPE_FLOAT_AND_HALF_AND_BF16(ITYPE, NAME, ...)                                   \
    if (ITYPE == at::ScalarType::BFloat16) { using input_t = at::BFloat16; __VA_ARGS__(); }        \
    else { AT_ERROR(#NAME, " (peftfw baseline build): bf16 inputs only, got '", toString(ITYPE), "'"); }
#undef DISPATCH_WTYPE_FLOAT_AND_HALF_AND_BF16
#define DISPATCH_WTYPE_FLOAT_AND_HALF_AND_BF16(WTYPE, NAME, ...)                                   \
    if (WTYPE == at::ScalarType::BFloat16) { using weight_t = at::BFloat16; __VA_ARGS__(); }       \
    else { AT_ERROR(#NAME, " (peftfw baseline build): bf16 weights only, got '", toString(WTYPE), "'"); }
EOF
# Include it right after the upstream macro definitions (before the first template declaration).
sed -i '0,/^template<typename input_t, typename weight_t>/s//#include "peftfw_dispatch.h"\n&/' \
  "$ss/selective_scan.cpp" "$cc/causal_conv1d.cpp"
check "$ss/selective_scan.cpp" '^#include "peftfw_dispatch.h"' 1
check "$cc/causal_conv1d.cpp" '^#include "peftfw_dispatch.h"' 1
# Explicit instantiations: keep <bf16, float> (scan) and <bf16, bf16> (conv).
sed -i '/complex_t>/d' "$ss/selective_scan_fwd_bf16.cu"
check "$ss/selective_scan_fwd_bf16.cu" '^template void' 1
for f in fwd bwd update; do
  sed -i '/^template void causal_conv1d_/{/<at::BFloat16, at::BFloat16>/!d}' "$cc/causal_conv1d_$f.cu"
done
check "$cc/causal_conv1d_fwd.cu" '^template void' 2
check "$cc/causal_conv1d_bwd.cu" '^template void' 2
check "$cc/causal_conv1d_update.cu" '^template void' 1

if [ "$mode" = lean ]; then
  # A run-time switch whose value is fixed for Mamba-1 training compiles only that branch; the value is
  # checked at run time, so another input raises an error naming the condition.
  for h in "$ss/static_switch.h" "$cc/static_switch.h"; do
    cat >> "$h" <<'EOF'

// peftfw baseline build (scripts/baseline_mamba1.sh): a BOOL_SWITCH fixed to one value.
#define PEFTFW_FIXED(COND, CONST_NAME, VALUE, ...)                                                      \
    [&] {                                                                                               \
        TORCH_CHECK(bool(COND) == VALUE, "peftfw lean baseline build supports only (" #COND ") == " #VALUE); \
        static constexpr bool CONST_NAME = VALUE;                                                       \
        return __VA_ARGS__();                                                                           \
    }()
EOF
  done
  fix() {  # fix FILE CONST_NAME VALUE: 'BOOL_SWITCH(cond, CONST_NAME, [' -> 'PEFTFW_FIXED(cond, CONST_NAME, VALUE, ['
    sed -i "s/BOOL_SWITCH(\([^;]*\), $2, \[/PEFTFW_FIXED(\1, $2, $3, [/" "$1"
  }
  # --- the scan: variable B/C, z and delta_softplus (mamba_inner_fn and selective_scan_fn as transformers
  #     calls them), and one (threads, items) size: seqlen > 1024. kIsEvenLen stays a switch.
  for k in fwd bwd; do
    f=$ss/selective_scan_${k}_kernel.cuh
    for c in kIsVariableB kIsVariableC kHasZ kDeltaSoftplus; do fix "$f" $c true; done
    sed -i "s/selective_scan_${k}_launch<\(32\|64\), [0-9]*, input_t, weight_t>(params, stream);/TORCH_CHECK(false, \"selective_scan (peftfw lean baseline build) supports only seqlen > 1024\");/" "$f"
    check "$f" 'BOOL_SWITCH(' 1
    check "$f" "selective_scan_${k}_launch<128, 16, input_t" 2   # the CUDA and the ROCm branch
    check "$f" "selective_scan_${k}_launch<\(32\|64\)," 0
  done
  check "$ss/selective_scan_fwd_kernel.cuh" 'PEFTFW_FIXED(' 3
  check "$ss/selective_scan_bwd_kernel.cuh" 'PEFTFW_FIXED(' 4
  # --- the conv: width 4 (Mamba-1's d_conv), silu, no seq_idx / final states, not deterministic; both
  #     layouts (mamba_inner_fn passes channel-first x, transformers' unfused path a channel-last view).
  fix "$cc/causal_conv1d_fwd.cu" kHasSeqIdx false
  for c in "kSiluAct true" "kDeterministic false" "kHasSeqIdx false" "kHasDfinalStates false"; do
    fix "$cc/causal_conv1d_bwd.cu" $c
  done
  for f in fwd bwd update; do
    sed -i 's/causal_conv1d_\(channellast_\)\?\(fwd\|bwd\|update\)_launch<\([0-9]*\), [23], input_t, weight_t>(params, stream);/TORCH_CHECK(false, "causal_conv1d (peftfw lean baseline build) supports only width 4");/' \
      "$cc/causal_conv1d_$f.cu"
  done
  check "$cc/causal_conv1d_fwd.cu" "_launch<[0-9]*, 4, input_t, weight_t>(params, stream)" 2
  check "$cc/causal_conv1d_bwd.cu" "_launch<[0-9]*, 4, input_t, weight_t>(params, stream)" 2
  check "$cc/causal_conv1d_update.cu" "_launch<[0-9]*, 4, input_t, weight_t>(params, stream)" 1
  for f in fwd bwd update; do check "$cc/causal_conv1d_$f.cu" "_launch<[0-9]*, [23], input_t" 0; done
  check "$cc/causal_conv1d_fwd.cu" 'BOOL_SWITCH(' 1    # kIsVecLoad
  check "$cc/causal_conv1d_bwd.cu" 'BOOL_SWITCH(' 2    # kIsVecLoad, kChunkSizeL64
  check "$cc/causal_conv1d_fwd.cu" 'PEFTFW_FIXED(' 1
  check "$cc/causal_conv1d_bwd.cu" 'PEFTFW_FIXED(' 6
fi
[ $fail = 0 ] || { echo "BASELINE BUILD FAILED: the $mode trims did not apply to these sources (use MAMBA1_BUILD=bf16?)"; exit 1; }

build_ext() {  # build_ext NAME SRC_DIR SOURCES...   -> .baseline/build/NAME/NAME.so, log /tmp/bl_NAME.log
  local name=$1 dir=$2; shift 2
  local t=$(date +%s)
  mkdir -p "$bl/build/$name"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-12} python3 - "$name" "$dir" "$bl/build/$name" "$@" > "/tmp/bl_$name.log" 2>&1 <<'EOF'
import os, sys
from torch.utils.cpp_extension import load
name, src, build, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# upstream's nvcc flags (setup.py) for one architecture; the C++ standard is left to torch's default
nvcc = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--ptxas-options=-v",
        "-lineinfo", "-gencode", "arch=compute_90,code=sm_90"]
load(name=name, sources=[os.path.join(src, f) for f in files], build_directory=build,
     extra_cflags=["-O3"], extra_cuda_cflags=nvcc, extra_include_paths=[src], with_cuda=True, verbose=True)
print("loaded", name)
EOF
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  if [ $rc = 0 ] && [ -f "$bl/build/$name/$name.so" ]; then
    echo "BASELINE BUILD $name: OK (${dt}s, $mode)"; echo "$name ok $mode ${dt}s" >> "$bl/build/STATUS"
  else
    echo "BASELINE BUILD $name: FAILED (rc $rc after ${dt}s, $mode); log tail:"
    grep -m8 -B2 -A6 "error" "/tmp/bl_$name.log"; tail -25 "/tmp/bl_$name.log"
    echo "$name FAILED $mode" >> "$bl/build/STATUS"; return 1
  fi
}

echo "baseline build ($mode) started $(date +%T)"
build_ext selective_scan_cuda "$ss" selective_scan.cpp selective_scan_fwd_bf16.cu selective_scan_bwd_bf16_real.cu \
  > /tmp/bl_ss.out 2>&1 &
p1=$!
build_ext causal_conv1d_cuda "$cc" causal_conv1d.cpp causal_conv1d_fwd.cu causal_conv1d_bwd.cu causal_conv1d_update.cu \
  > /tmp/bl_cc.out 2>&1 &
p2=$!
wait $p1; r1=$?
wait $p2; r2=$?
cat /tmp/bl_ss.out /tmp/bl_cc.out
for n in selective_scan_cuda causal_conv1d_cuda; do  # the kernels' register / spill lines (ptxas -v)
  echo "-- ptxas for $n:"; grep -E "Compiling entry|registers|spill" "/tmp/bl_$n.log" | sed 's/^ *//' | head -40
done
if [ $r1 = 0 ] && [ $r2 = 0 ]; then
  # Import check and a small numerical check against upstream's pure-PyTorch references.
  python3 - "$bl" <<'EOF'
import sys, torch
bl = sys.argv[1]
sys.path[:0] = [f"{bl}/build/selective_scan_cuda", f"{bl}/build/causal_conv1d_cuda", f"{bl}/mamba", f"{bl}/causal-conv1d"]
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref
from causal_conv1d import causal_conv1d_fn
from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
b, d, n, l = 2, 64, 16, 2048
u, z = (torch.randn(b, d, l, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
dt = 0.5 * torch.randn(b, d, l, device=dev, dtype=bf)
B, C = (torch.randn(b, n, l, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
A = (-torch.rand(d, n, device=dev) - 0.5).requires_grad_()
D, db = torch.randn(d, device=dev, requires_grad=True), torch.randn(d, device=dev, requires_grad=True)
args = (u, dt, A, B, C, D, z, db, True)
y = selective_scan_fn(*args); yr = selective_scan_ref(*args)
g = torch.autograd.grad(y.float().square().sum(), (u, A, D))
gr = torch.autograd.grad(yr.float().square().sum(), (u, A, D))
rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()
errs = [rel(y, yr)] + [rel(a, r) for a, r in zip(g, gr)]
w = torch.randn(2 * d, 4, device=dev, dtype=bf, requires_grad=True)
bias = torch.randn(2 * d, device=dev, dtype=bf)
for x in (torch.randn(b, 2 * d, l, device=dev, dtype=bf),                   # channel-first (mamba_inner_fn)
          torch.randn(b, l, 2 * d, device=dev, dtype=bf).transpose(1, 2)):  # channel-last (transformers' split path)
    x.requires_grad_()
    o, orf = causal_conv1d_fn(x, w, bias, activation="silu"), causal_conv1d_ref(x, w, bias, activation="silu")
    go = torch.randn_like(o)
    errs += [rel(o, orf)] + [rel(a, r) for a, r in zip(torch.autograd.grad(o, (x, w), go),
                                                       torch.autograd.grad(orf, (x, w), go))]
print("kernel check (rel. error vs reference: scan out, du, dA, dD; conv out, dx, dw channel-first, "
      "then channel-last):", " ".join(f"{e:.1e}" for e in errs))
print("KERNEL CHECK", "OK" if max(errs) < 5e-2 else "SUSPICIOUS")
EOF
  [ $? = 0 ] || echo "KERNEL CHECK FAILED (the extensions built but did not run; see above)"
  echo "BASELINE BUILD: OK in $(( $(date +%s) - t0 ))s ($mode)"
else
  echo "BASELINE BUILD: FAILED after $(( $(date +%s) - t0 ))s ($mode)"; exit 1
fi
