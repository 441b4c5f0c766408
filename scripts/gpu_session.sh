#!/usr/bin/env bash
# One device call's worth of GPU work, logs under $OUT (or ./gpu_session): build, the GPU
# tests, compute-sanitizer on the newest kernels, the kernel bench and the end-to-end bench.
# Stages can be picked:
#   scripts/gpu_session.sh [build] [test] [sanitize] [kernels] [ktrace] [ncu] [e2e] [profile] [mamba1]
# (default: build test sanitize kernels e2e; ktrace: a Kineto trace of one SSD forward+backward
# at 32x1280 and 1x4096, summarised per kernel; ncu: Nsight Compute's throughput, occupancy and
# warp-stall sections for the four per-chunk SSD kernels at 32x1280; mamba1: the Mamba-1 selective
# scan bench at the 2.8B dims and the mamba-2.8b-shape training run, each beside the Python stack's
# (mamba_ssm's selective_scan_cuda built by scripts/baseline_mamba1.sh from a carried .baseline/).
# Device time is scarce (a cold build takes ~2.5 min); the whole list fits one 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_session}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize kernels e2e)
export LD_LIBRARY_PATH=/tmp/deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
bin=build-gpu/bin
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
stamp() { echo "== $1 $(date +%T)" | tee -a "$out/session.log"; }
for s in "${stages[@]}"; do
  case $s in
    build)
      stamp build
      OUT=$out bash scripts/device_build.sh build-gpu >> "$out/session.log" 2>&1 || { echo "build failed"; tail -30 "$out/session.log"; exit 1; } ;;
    test)
      stamp test
      "$bin/peftfw_gpu_tests" > "$out/gpu_tests.log" 2>&1
      echo "gpu tests rc=$?" | tee -a "$out/session.log"
      grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$out/gpu_tests.log" | tee -a "$out/session.log" ;;
    sanitize)
      stamp sanitize
      compute-sanitizer --tool memcheck "$bin/peftfw_gpu_tests" \
        --gtest_filter='LoraDownCuda.*:LoraCuda.*:*SsdCuda.FusedEqualsReference*:*Mamba1Cuda*' > "$out/memcheck.log" 2>&1
      tail -3 "$out/memcheck.log" | tee -a "$out/session.log"
      compute-sanitizer --tool racecheck "$bin/peftfw_gpu_tests" \
        --gtest_filter='*SsdCuda.FusedEqualsReference*:*Mamba1Cuda*' > "$out/racecheck.log" 2>&1
      tail -3 "$out/racecheck.log" | tee -a "$out/session.log" ;;
    kernels)
      stamp kernels
      "$bin/peftfw_bench_kernels" "$out/kernels.json" > "$out/kernels.log" 2>&1
      tail -n 12 "$out/kernels.log" | tee -a "$out/session.log" ;;
    ktrace)
      stamp ktrace
      PEFTFW_BENCH_SHAPES=32x1280,1x4096 PEFTFW_PROFILE_TRACE=/tmp/ssd "$bin/peftfw_bench_kernels" /tmp/ktrace.json \
        > "$out/ktrace_run.log" 2>&1
      for shape in 32x1280 1x4096; do
        echo "-- SSD forward+backward $shape"
        python3 bench/profile_summary.py "/tmp/ssd-$shape.json" --top 25 --cpu
      done > "$out/ktrace.txt" 2>&1
      cat "$out/ktrace.txt" | tee -a "$out/session.log" ;;
    ncu)
      stamp ncu
      # One launch of each kernel (a shared launch count would spend itself on the forward
      # kernels of the bench's warm-up runs).
      for k in scan_fwd states_pass bwd_off bwd_diag; do
        PEFTFW_BENCH_SHAPES=32x1280 ncu --kernel-name regex:"$k" --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          "$bin/peftfw_bench_kernels" /tmp/ncu_bench.json
      done > "$out/ncu.txt" 2>&1
      grep -E "bwd_diag|scan_fwd|states_pass|bwd_off|Duration|Throughput|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Warp Cycles Per Issued|Registers Per|Local|Issue Slots|Executed Ipc|stalled|Bank|L1/TEX Hit|L2 Hit|DRAM Through" "$out/ncu.txt" \
        | grep -v "^    ---" | head -150 | tee -a "$out/session.log" ;;
    e2e)
      stamp e2e
      python3 bench/e2e_gpu.py --peftfw "$bin/peftfw" --shapes 32x1280 --steps 7 --out /tmp/e2e \
        > "$out/e2e.log" 2>&1
      tail -n 6 "$out/e2e.log" | tee -a "$out/session.log" ;;
    profile)
      stamp profile
      PEFTFW_PROFILE_TRACE=/tmp/trace.json PEFTFW_PROFILE_STEP=6 \
        python3 bench/e2e_gpu.py --peftfw "$bin/peftfw" --shapes 32x1280 --steps 7 --out /tmp/e2e_prof \
        > "$out/profile_run.log" 2>&1
      python3 bench/profile_summary.py /tmp/trace.json > "$out/profile.txt" 2>&1
      head -40 "$out/profile.txt" | tee -a "$out/session.log" ;;
    mamba1)
      stamp mamba1
      (timeout 400 bash scripts/baseline_mamba1.sh > "$out/baseline_build.log" 2>&1) &
      bl=$!
      PEFTFW_BENCH_SHAPES=1x4096 PEFTFW_BENCH_SCAN_SHAPES=8x2048,1x8192 "$bin/peftfw_bench_kernels" \
        "$out/scan.json" > "$out/scan.log" 2>&1
      grep -i scan "$out/scan.log" | tee -a "$out/session.log"
      python3 bench/e2e_gpu.py --peftfw "$bin/peftfw" --recipe recipes/bench/mamba_2p8b_e2e.toml --shapes 8x2048 \
        --params 2768345600 --steps 7 --out /tmp/e2e_mamba1 > "$out/e2e_mamba1.log" 2>&1
      tail -n 4 "$out/e2e_mamba1.log" | tee -a "$out/session.log"
      wait $bl
      tail -n 2 "$out/baseline_build.log" | tee -a "$out/session.log"
      python3 bench/mamba1_baseline.py scan 2>/dev/null | tee "$out/baseline_scan.json" | tee -a "$out/session.log"
      python3 bench/mamba1_baseline.py e2e 2>/dev/null | tee "$out/baseline_e2e.json" | tee -a "$out/session.log" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
stamp done
