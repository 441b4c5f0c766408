// Kernel timings at Granite-4.0-H-Micro dims (64 heads x 64, state 128, 1 group,
// conv channels 4352, kernel 4, norm width 4096 with gate), bf16 inputs:
// SSD forward and forward+backward (the fast path and, where it fits, the
// LibTorch reference), conv1d+SiLU and gated RMSNorm forward+backward.
//   build/bin/peftfw_bench_kernels [OUT.json]     (CUDA machine)
// PEFTFW_BENCH_SHAPES=32x1280,1x4096 limits the run to those shapes.
// With PEFTFW_PROFILE_TRACE=PREFIX, one SSD forward+backward per shape is also
// recorded as a Kineto trace, PREFIX-<batch>x<length>.json (bench/profile_summary.py).
// Each figure is the median of 20 timed runs after 3 warm-ups (CUDA-synchronised wall time).
//
// Then the Mamba-1 selective scan (peftfw/kernels/mamba1.hpp) at mamba-2.8b dims (D 5120,
// state 16, bf16 u / delta / z / B / C, float32 A_log and D, z and D on): forward (no_grad)
// and forward+backward (gradients for every input), timed with CUDA events (median of 20
// after 3 warm-ups), with the bytes that must move (each input and output read or written
// once) and that figure's share of the H100 SXM's 3.35 TB/s datasheet HBM3 bandwidth.
// Shapes 8x2048 and 1x8192; PEFTFW_BENCH_SCAN_SHAPES=BxT,... picks others ("none": skip);
// when only PEFTFW_BENCH_SHAPES is set (ncu / trace runs of the SSD) the scan is skipped.
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "peftfw/kernels/mamba1.hpp"
#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/ops.hpp"
#include "peftfw/kernels/ssd_fused.hpp"
#include "peftfw/train/device_memory.hpp"

namespace ops = peftfw::kernels::mamba2;
namespace kernels = peftfw::kernels;
using torch::Tensor;

namespace {

double median_ms(const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  torch::cuda::synchronize();
  std::vector<double> t;
  for (int i = 0; i < 20; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    torch::cuda::synchronize();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The median of 20 CUDA-event timings of fn on the current stream, after 3 warm-ups.
double median_event_ms(const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  torch::cuda::synchronize();
  std::vector<double> t;
  for (int i = 0; i < 20; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    fn();
    stop.record();
    stop.synchronize();
    t.push_back(start.elapsed_time(stop));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// "8x2048,1x8192" -> {{8, 2048}, {1, 8192}}; false on a malformed item.
bool parse_shapes(const std::string& text, std::vector<std::pair<int64_t, int64_t>>* shapes) {
  shapes->clear();
  for (std::string rest = text; !rest.empty();) {
    const auto comma = rest.find(',');
    const std::string item = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    long b = 0, t = 0;
    if (std::sscanf(item.c_str(), "%ldx%ld", &b, &t) != 2 || b < 1 || t < 1) return false;
    shapes->emplace_back(b, t);
  }
  return true;
}

constexpr double kHbmBytesPerSecond = 3.35e12;  // H100 SXM HBM3, datasheet (performance.md)

// The Mamba-1 selective scan section: one JSON object per shape appended to `json`.
bool bench_selective_scan(std::string* json) {
  std::vector<std::pair<int64_t, int64_t>> shapes = {{8, 2048}, {1, 8192}};
  const char* only = std::getenv("PEFTFW_BENCH_SCAN_SHAPES");
  if (only == nullptr && std::getenv("PEFTFW_BENCH_SHAPES") != nullptr) return true;
  if (only != nullptr && std::string(only) == "none") return true;
  if (only != nullptr && !parse_shapes(only, &shapes)) {
    std::fprintf(stderr, "PEFTFW_BENCH_SCAN_SHAPES: '%s' is not BATCHxLENGTH,... (e.g. 8x2048)\n", only);
    return false;
  }
  namespace m1 = peftfw::kernels::mamba1;
  const int64_t D = 5120, N = 16;
  auto o = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto f32 = o.dtype(torch::kFloat32);
  std::printf("\nMamba-1 selective scan, D %ld, N %ld, bf16 (fraction of %.2f TB/s HBM, each tensor moved once)\n", D, N,
              kHbmBytesPerSecond / 1e12);
  std::printf("| batch x length | fwd | fwd bytes | fwd of HBM | fwd+bwd | fwd+bwd bytes | fwd+bwd of HBM |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (auto [Bsz, T] : shapes) {
    torch::manual_seed(0);
    m1::ScanArgs a;
    a.u = torch::randn({Bsz, T, D}, o).requires_grad_(true);
    a.delta = (torch::randn({Bsz, T, D}, f32) - 2.0).to(torch::kBFloat16).requires_grad_(true);
    a.z = torch::randn({Bsz, T, D}, o).requires_grad_(true);
    a.B = torch::randn({Bsz, T, N}, o).requires_grad_(true);
    a.C = torch::randn({Bsz, T, N}, o).requires_grad_(true);
    a.A_log = torch::log(torch::arange(1, N + 1, f32)).repeat({D, 1}).requires_grad_(true);
    a.D = torch::ones({D}, f32).requires_grad_(true);
    auto dy = torch::randn({Bsz, T, D}, f32);
    const std::vector<Tensor> wrt = {a.u, a.delta, a.z, a.B, a.C, a.A_log, a.D};
    const double fwd = median_event_ms([&] {
      torch::NoGradGuard ng;
      m1::selective_scan(a);
    });
    const double fb = median_event_ms([&] {
      auto r = m1::selective_scan(a);
      torch::autograd::grad({r.y}, wrt, {dy});
    });
    // Bytes: forward reads u, delta, z (bf16), B, C (bf16), A_log, D (f32) and writes y (f32) and
    // the final state (f32); the backward reads those inputs and dy (f32) and writes du, ddelta,
    // dz (bf16), dB, dC (bf16), dA_log and dD (f32).
    const double tok = static_cast<double>(Bsz * T);
    const double params = D * N * 4.0 + D * 4.0, bc = tok * N * 2 * 2.0;
    const double fwd_bytes = tok * D * (3 * 2.0 + 4.0) + bc + params + Bsz * D * N * 4.0;
    const double bwd_bytes = tok * D * (3 * 2.0 + 4.0 + 3 * 2.0) + 2 * bc + 2 * params;
    const double fb_bytes = fwd_bytes + bwd_bytes;
    const double fwd_frac = fwd_bytes / (fwd * 1e-3) / kHbmBytesPerSecond;
    const double fb_frac = fb_bytes / (fb * 1e-3) / kHbmBytesPerSecond;
    std::printf("| %ld x %ld | %.3f ms | %.1f MB | %.0f%% | %.3f ms | %.1f MB | %.0f%% |\n", Bsz, T, fwd, fwd_bytes / 1e6,
                100 * fwd_frac, fb, fb_bytes / 1e6, 100 * fb_frac);
    std::fflush(stdout);
    char buf[400];
    std::snprintf(buf, sizeof buf,
                  "%s{\"op\":\"mamba1_selective_scan\",\"batch\":%ld,\"length\":%ld,\"dim\":%ld,\"state\":%ld,"
                  "\"fwd_ms\":%.4f,\"fwd_bytes\":%.0f,\"fwd_hbm_fraction\":%.4f,\"fwd_bwd_ms\":%.4f,"
                  "\"fwd_bwd_bytes\":%.0f,\"fwd_bwd_hbm_fraction\":%.4f,\"hbm_bytes_per_s\":%.3g}",
                  json->size() > 1 ? "," : "", Bsz, T, D, N, fwd, fwd_bytes, fwd_frac, fb, fb_bytes, fb_frac,
                  kHbmBytesPerSecond);
    *json += buf;
    c10::cuda::CUDACachingAllocator::emptyCache();
  }
  return true;
}

// Runs fn, returning the median in ms, or -1 when it runs out of memory.
double timed_or_oom(const std::function<void()>& fn) {
  try {
    return median_ms(fn);
  } catch (const c10::OutOfMemoryError&) {
    return -1.0;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "peftfw_bench_kernels: no CUDA device\n");
    return 1;
  }
  if (std::string(kernels::implementation_for(torch::kCUDA)) != "cuda") {
    std::fprintf(stderr, "peftfw_bench_kernels: the CUDA kernels are not in use (PEFTFW_KERNELS=reference?)\n");
    return 1;
  }
  const int64_t H = 64, P = 64, N = 128, G = 1, Cc = H * P + 2 * G * N, K = 4;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 4096}, {8, 1280}, {32, 1280}};
  if (const char* only = std::getenv("PEFTFW_BENCH_SHAPES")) {  // e.g. "32x1280,1x4096" (for ncu runs)
    shapes.clear();
    for (std::string rest = only; !rest.empty();) {
      const auto comma = rest.find(',');
      const std::string item = rest.substr(0, comma);
      rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
      long b = 0, t = 0;
      if (std::sscanf(item.c_str(), "%ldx%ld", &b, &t) != 2 || b < 1 || t < 1) {
        std::fprintf(stderr, "PEFTFW_BENCH_SHAPES: '%s' is not BATCHxLENGTH (e.g. 32x1280)\n", item.c_str());
        return 2;
      }
      shapes.emplace_back(b, t);
    }
  }
  auto o = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  auto f32 = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
  std::string json = "[";
  std::printf("| batch x length | SSD fwd | SSD fwd+bwd | reference SSD fwd+bwd | conv1d fwd+bwd | gated norm fwd+bwd |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (auto [Bsz, T] : shapes) {
    torch::manual_seed(0);
    auto x = torch::randn({Bsz, T, H, P}, o).requires_grad_(true);
    auto dt = torch::randn({Bsz, T, H}, f32).requires_grad_(true);
    auto Bm = torch::randn({Bsz, T, G, N}, o).requires_grad_(true);
    auto Cm = torch::randn({Bsz, T, G, N}, o).requires_grad_(true);
    auto A_log = torch::log(torch::linspace(1.0, 16.0, H, f32)).requires_grad_(true);
    auto D = torch::ones({H}, f32).requires_grad_(true);
    auto dt_bias = torch::zeros({H}, f32).requires_grad_(true);
    ops::SsdArgs a;
    a.x = x, a.dt = dt, a.A_log = A_log, a.B = Bm, a.C = Cm, a.D = D, a.dt_bias = dt_bias;
    a.chunk_size = 256;
    auto dy = torch::randn({Bsz, T, H, P}, f32);
    const double fwd = median_ms([&] {
      torch::NoGradGuard ng;
      ops::ssd_chunk_scan(a);
    });
    const double fb = median_ms([&] {
      auto r = ops::ssd_chunk_scan(a);
      torch::autograd::grad({r.y}, {x, dt, A_log, Bm, Cm, D, dt_bias}, {dy});
    });
    if (const char* trace = std::getenv("PEFTFW_PROFILE_TRACE")) {
      peftfw::train::start_trace(x.device());
      auto r = ops::ssd_chunk_scan(a);
      torch::autograd::grad({r.y}, {x, dt, A_log, Bm, Cm, D, dt_bias}, {dy});
      torch::cuda::synchronize();
      peftfw::train::save_trace(std::string(trace) + "-" + std::to_string(Bsz) + "x" + std::to_string(T) + ".json");
    }
    const double ref = timed_or_oom([&] {
      auto r = ops::reference::ssd_chunk_scan(a);
      torch::autograd::grad({r.y}, {x, dt, A_log, Bm, Cm, D, dt_bias}, {dy});
    });
    auto xc = torch::randn({Bsz, T, Cc}, o).requires_grad_(true);
    auto w = torch::randn({Cc, K}, o).requires_grad_(true);
    auto bias = torch::randn({Cc}, o).requires_grad_(true);
    auto seq = torch::zeros({Bsz, T}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kLong));
    auto dc = torch::randn({Bsz, T, Cc}, o);
    const double conv = median_ms([&] {
      auto y = kernels::causal_conv1d(xc, w, bias, seq, true);
      torch::autograd::grad({y}, {xc, w, bias}, {dc});
    });
    auto yn = torch::randn({Bsz * T, H * P}, o).requires_grad_(true);
    auto zn = torch::randn({Bsz * T, H * P}, o).requires_grad_(true);
    auto wn = torch::ones({H * P}, o).requires_grad_(true);
    auto dn = torch::randn({Bsz * T, H * P}, o);
    const double norm = median_ms([&] {
      auto y = kernels::gated_rms_norm(yn, zn, wn, 1e-5);
      torch::autograd::grad({y}, {yn, zn, wn}, {dn});
    });
    char ref_s[32];
    if (ref < 0) std::snprintf(ref_s, sizeof ref_s, "out of memory");
    else std::snprintf(ref_s, sizeof ref_s, "%.2f ms", ref);
    std::printf("| %ld x %ld | %.2f ms | %.2f ms | %s | %.2f ms | %.2f ms |\n", Bsz, T, fwd, fb, ref_s, conv, norm);
    std::fflush(stdout);
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "%s{\"batch\":%ld,\"length\":%ld,\"ssd_fwd_ms\":%.4f,\"ssd_fwd_bwd_ms\":%.4f,"
                  "\"reference_ssd_fwd_bwd_ms\":%.4f,\"conv_fwd_bwd_ms\":%.4f,\"norm_fwd_bwd_ms\":%.4f}",
                  json.size() > 1 ? "," : "", Bsz, T, fwd, fb, ref, conv, norm);
    json += buf;
    c10::cuda::CUDACachingAllocator::emptyCache();
  }
  if (!bench_selective_scan(&json)) return 2;
  json += "]\n";
  if (argc > 1) std::ofstream(argv[1]) << json;
  return 0;
}
