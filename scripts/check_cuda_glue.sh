#!/usr/bin/env bash
# Syntax-checks the LibTorch CUDA glue (the .cpp files built only with a CUDA LibTorch) on a
# machine whose torch is the CPU wheel: that wheel ships the ATen/c10 CUDA headers, and the
# few CUDA library headers they include (cuBLAS, cuSPARSE, cuSOLVER) are stood in for by
# stubs declaring the handle and status types they name. Needs the CUDA toolkit's headers.
#   scripts/check_cuda_glue.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
inc=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
cuda_inc=""
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/lib/cuda; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime_api.h" ]; then cuda_inc=$d/include; break; fi
done
[ -n "$cuda_inc" ] || { echo "check_cuda_glue: no CUDA toolkit headers found; skipped"; exit 0; }
stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
mkdir -p "$stubs/c10/cuda/impl"
echo '#pragma once' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\n' > "$stubs/cusparse.h"
printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' > "$stubs/cublas_v2.h"
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$stubs/cublasLt.h"
printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cusolverStatus_t;\n' > "$stubs/cusolverDn.h"
echo '#pragma once' > "$stubs/cusolver_common.h"
# The GLUE files of every kernel family (kernels/CMakeLists.txt), the sources whose CUDA parts
# sit under PEFTFW_HAVE_CUDA, and the CUDA-only tests.
files=(kernels/common/cuda/ops_cuda.cpp kernels/common/ops.cpp kernels/common/dispatch.cpp
       kernels/common/row_nll.cpp kernels/common/lora_down.cpp
       kernels/mamba2/cuda/ssd_cuda.cpp kernels/mamba2/dispatch.cpp
       kernels/mamba1/cuda/scan_cuda.cpp kernels/mamba1/dispatch.cpp
       tests/gpu/test_kernels_cuda.cpp tests/gpu/test_mamba1_cuda.cpp framework/src/train/device_memory.cpp)
status=0
for f in "${files[@]}"; do
  if ! g++ -std=c++17 -fsyntax-only -Wall -Werror=return-type -DPEFTFW_HAVE_CUDA=1 -DPEFTFW_MICRO_CONFIG='"unused"' \
      -I"$stubs" -isystem "$inc" -isystem "$inc/torch/csrc/api/include" -isystem "$cuda_inc" \
      -Ikernels/common/include -Ikernels/mamba2/include -Ikernels/mamba1/include -Iframework/include "$f"; then
    echo "check_cuda_glue: $f does not compile"
    status=1
  fi
done
[ $status -eq 0 ] && echo "check_cuda_glue: ${#files[@]} files compile"
exit $status
