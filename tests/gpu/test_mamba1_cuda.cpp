// The Mamba-1 selective scan's CUDA kernels (kernels/mamba1/cuda) against the LibTorch reference
// on the same GPU: y, the final state and every input gradient, for float32 (against the
// reference run in float64) and bfloat16 inputs (against the reference on the same bf16 inputs),
// sequence lengths on and off the kernels' tile and chunk sizes, packed sequences, state sizes
// 16 and 64, with and without an initial state, D and z, strided views, and the split of long
// sequences over several blocks. Then frozen A_log / D, and the decoding step.
// Built only with a CUDA LibTorch; ctest label "gpu".
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#include "peftfw/kernels/dispatch.hpp"
#include "peftfw/kernels/mamba1.hpp"

namespace m1 = peftfw::kernels::mamba1;
namespace kernels = peftfw::kernels;
using torch::Tensor;

namespace {

const torch::Device kCuda(torch::kCUDA);

// max |a - b| / max |b|, in float64
double rel(const Tensor& a, const Tensor& b) {
  auto a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  return (a64 - b64).abs().max().item<double>() / std::max(b64.abs().max().item<double>(), 1e-30);
}

void expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& what) {
  ASSERT_TRUE(got.defined()) << what << " is undefined";
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_FALSE(torch::isnan(got).any().item<bool>()) << what << " has NaN";
  const double e = rel(got, want);
  std::printf("  %-16s rel err %.2e (tol %.0e)\n", what.c_str(), e, tol);
  EXPECT_LE(e, tol) << what;
}

struct ScanCase {
  int64_t B, T, D, N;
  bool ids, init, skip, gate;
  torch::ScalarType dtype;
  bool strided = false;  // u, delta, z and B, C as column slices of wider tensors (the mixer's layout)
};

std::string describe(const ScanCase& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "B%ld T%ld D%ld N%ld%s%s%s%s%s %s", c.B, c.T, c.D, c.N, c.ids ? " ids" : "",
                c.init ? " init" : "", c.skip ? " D" : "", c.gate ? " z" : "", c.strided ? " strided" : "",
                c.dtype == torch::kBFloat16 ? "bf16" : c.dtype == torch::kHalf ? "fp16" : "fp32");
  return buf;
}

struct Inputs {
  m1::ScanArgs args;
  std::vector<Tensor> wrt;  // the inputs that take gradients
  std::vector<std::string> names;
};

Inputs make_inputs(const ScanCase& c) {
  auto o = torch::TensorOptions().device(kCuda);
  auto leaf = [&](Tensor t) { return t.to(c.dtype).detach().requires_grad_(true); };
  Inputs in;
  auto& a = in.args;
  if (c.strided) {
    auto xz = leaf(torch::randn({c.B, c.T, 3 * c.D + 5}, o));
    a.u = xz.narrow(2, 0, c.D);
    a.delta = xz.narrow(2, c.D, c.D);
    a.z = xz.narrow(2, 2 * c.D + 5, c.D);
    auto bc = leaf(torch::randn({c.B, c.T, 2 * c.N + 3}, o));
    a.B = bc.narrow(2, 3, c.N);
    a.C = bc.narrow(2, 3 + c.N, c.N);
    in.wrt = {xz, bc};
    in.names = {"dxz", "dBC"};
  } else {
    a.u = leaf(torch::randn({c.B, c.T, c.D}, o));
    a.delta = leaf(torch::randn({c.B, c.T, c.D}, o) * 0.5 - 1.0);
    a.B = leaf(torch::randn({c.B, c.T, c.N}, o));
    a.C = leaf(torch::randn({c.B, c.T, c.N}, o));
    in.wrt = {a.u, a.delta, a.B, a.C};
    in.names = {"du", "ddelta", "dB", "dC"};
    if (c.gate) {
      a.z = leaf(torch::randn({c.B, c.T, c.D}, o));
      in.wrt.push_back(a.z), in.names.push_back("dz");
    }
  }
  // S4D-real initialisation plus noise; A_log and D stay float32 (master copies).
  a.A_log = (torch::log(torch::arange(1, c.N + 1, o.dtype(torch::kFloat32))).repeat({c.D, 1}) +
             0.1 * torch::randn({c.D, c.N}, o))
                .requires_grad_(true);
  in.wrt.push_back(a.A_log), in.names.push_back("dA_log");
  if (c.skip) {
    a.D = torch::randn({c.D}, o).requires_grad_(true);
    in.wrt.push_back(a.D), in.names.push_back("dD");
  }
  if (c.init) {
    a.initial_state = torch::randn({c.B, c.D, c.N}, o).requires_grad_(true);
    in.wrt.push_back(a.initial_state), in.names.push_back("dinitial_state");
  }
  if (c.ids) {  // packed sequences: boundaries on and off the kernels' tiles and chunks
    a.seq_ids = torch::zeros({c.B, c.T}, o.dtype(torch::kLong));
    for (int64_t cut : {c.T / 5, c.T / 2, int64_t{64}, int64_t{130}, c.T - 7})
      if (cut > 0 && cut < c.T) a.seq_ids.narrow(1, cut, c.T - cut).add_(1);
    if (c.B > 1) a.seq_ids.narrow(0, 1, c.B - 1).narrow(1, 3, c.T - 3).add_(1);
  }
  return in;
}

// The same inputs as float64 leaves (for the float32 cases' reference).
m1::ScanArgs as_f64(const m1::ScanArgs& a, std::vector<Tensor>* leaves) {
  auto up = [&](const Tensor& t) {
    if (!t.defined()) return t;
    auto l = t.detach().to(torch::kFloat64).requires_grad_(true);
    leaves->push_back(l);
    return l;
  };
  m1::ScanArgs r;
  r.u = up(a.u), r.delta = up(a.delta), r.A_log = up(a.A_log), r.B = up(a.B), r.C = up(a.C);
  r.D = up(a.D), r.z = up(a.z), r.initial_state = up(a.initial_state);
  r.seq_ids = a.seq_ids;
  return r;
}

class Mamba1Cuda : public ::testing::TestWithParam<ScanCase> {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(Mamba1Cuda, ScanEqualsReference) {
  const ScanCase c = GetParam();
  std::printf("%s\n", describe(c).c_str());
  torch::manual_seed(7);
  ASSERT_STREQ(kernels::implementation_for(kCuda), "cuda");
  Inputs in = make_inputs(c);
  auto got = m1::selective_scan(in.args);  // the dispatch point: CUDA tensors take the kernels

  const bool low = c.dtype != torch::kFloat32;
  auto wy = torch::randn(got.y.sizes(), got.y.options()), wh = torch::randn(got.final_state.sizes(), got.y.options());
  auto g_got = torch::autograd::grad({(got.y * wy).sum() + (got.final_state * wh).sum()}, in.wrt);

  Tensor y_ref, h_ref;
  std::vector<Tensor> g_ref;
  if (low) {  // the reference on the same bf16 / fp16 inputs
    auto ref = m1::reference::selective_scan(in.args);
    y_ref = ref.y, h_ref = ref.final_state;
    g_ref = torch::autograd::grad({(ref.y * wy).sum() + (ref.final_state * wh).sum()}, in.wrt);
  } else {  // float64: the float32 kernels' error alone
    std::vector<Tensor> leaves;
    auto a64 = as_f64(in.args, &leaves);
    auto ref = m1::reference::selective_scan(a64);
    y_ref = ref.y, h_ref = ref.final_state;
    auto loss = (ref.y * wy.to(torch::kFloat64)).sum() + (ref.final_state * wh.to(torch::kFloat64)).sum();
    if (c.strided) {  // gradients of the wide tensors: chain through the views
      g_ref = torch::autograd::grad({loss}, leaves);
      // leaves: u, delta, A_log, B, C, (D), z, (init) -> rebuild dxz, dBC, then the rest
      auto dxz = torch::zeros(in.wrt[0].sizes(), g_ref[0].options());
      dxz.narrow(2, 0, c.D).copy_(g_ref[0]);
      dxz.narrow(2, c.D, c.D).copy_(g_ref[1]);
      size_t k = 5;
      Tensor dD = c.skip ? g_ref[k++] : Tensor();
      dxz.narrow(2, 2 * c.D + 5, c.D).copy_(g_ref[k++]);
      Tensor dinit = c.init ? g_ref[k++] : Tensor();
      auto dbc = torch::zeros(in.wrt[1].sizes(), g_ref[0].options());
      dbc.narrow(2, 3, c.N).copy_(g_ref[3]);
      dbc.narrow(2, 3 + c.N, c.N).copy_(g_ref[4]);
      std::vector<Tensor> g = {dxz, dbc, g_ref[2]};
      if (c.skip) g.push_back(dD);
      if (c.init) g.push_back(dinit);
      g_ref = g;
    } else {
      // leaves are in ScanArgs order (u, delta, A_log, B, C, D, z, init); wrt is
      // u, delta, B, C, (z), A_log, (D), (init).
      std::vector<Tensor> order = {leaves[0], leaves[1], leaves[3], leaves[4]};
      size_t k = 5;
      Tensor D64 = c.skip ? leaves[k++] : Tensor();
      if (c.gate) order.push_back(leaves[k++]);
      order.push_back(leaves[2]);
      if (c.skip) order.push_back(D64);
      if (c.init) order.push_back(leaves[k++]);
      g_ref = torch::autograd::grad({loss}, order);
    }
  }
  const double tol_out = low ? 2e-2 : 1e-5, tol_grad = low ? 5e-2 : 1e-4;
  expect_close(got.y, y_ref, tol_out, "y");
  expect_close(got.final_state, h_ref, tol_out, "final_state");
  ASSERT_EQ(g_got.size(), g_ref.size());
  for (size_t i = 0; i < g_got.size(); ++i) {
    EXPECT_EQ(g_got[i].scalar_type(), in.wrt[i].scalar_type()) << in.names[i];
    expect_close(g_got[i], g_ref[i], tol_grad, in.names[i]);
  }
}

const auto f32 = torch::kFloat32;
const auto bf16 = torch::kBFloat16;
INSTANTIATE_TEST_SUITE_P(
    Shapes, Mamba1Cuda,
    ::testing::Values(
        //        B   T    D   N   ids    init   D      z      dtype
        ScanCase{2, 37, 40, 16, false, false, true, true, f32},        // T off every tile, one chunk
        ScanCase{2, 1, 40, 16, false, true, true, true, f32},          // T = 1
        ScanCase{2, 300, 70, 16, true, true, true, true, f32},         // packed ids, segments
        ScanCase{1, 300, 33, 64, true, true, false, false, f32},       // N = 64, no D, no z
        ScanCase{2, 129, 24, 16, false, false, false, true, f32},      // no initial state
        ScanCase{4, 130, 6500, 16, true, false, true, true, f32},      // many channels: one segment
        ScanCase{1, 1000, 7, 48, true, true, true, true, f32},         // long, padded N
        ScanCase{2, 97, 40, 16, true, true, true, true, f32, true},    // strided views
        ScanCase{2, 200, 40, 16, true, true, true, true, bf16},        // bf16
        ScanCase{1, 150, 20, 64, false, true, true, true, bf16},       // bf16, N = 64
        ScanCase{2, 70, 24, 16, false, false, true, true, bf16, true}  // bf16, strided
        ));

// Frozen A_log and D (requires_grad false) get no gradient; the others still do.
TEST(Mamba1CudaFrozen, NoGradientForFrozenParameters) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(3);
  Inputs in = make_inputs({2, 80, 40, 16, true, true, true, true, torch::kBFloat16});
  in.args.A_log = in.args.A_log.detach();
  in.args.D = in.args.D.detach();
  auto got = m1::selective_scan(in.args);
  auto ref = m1::reference::selective_scan(in.args);
  auto wy = torch::randn(got.y.sizes(), got.y.options());
  (got.y * wy).sum().backward();
  EXPECT_FALSE(in.args.A_log.grad().defined());
  EXPECT_FALSE(in.args.D.grad().defined());
  ASSERT_TRUE(in.args.u.grad().defined());
  std::vector<Tensor> kept = {in.args.u, in.args.delta, in.args.B, in.args.C, in.args.z, in.args.initial_state};
  std::vector<Tensor> g_got;
  for (auto& t : kept) g_got.push_back(t.grad().clone()), t.mutable_grad().reset();
  auto g_ref = torch::autograd::grad({(ref.y * wy).sum()}, kept);
  const char* names[] = {"du", "ddelta", "dB", "dC", "dz", "dinitial_state"};
  for (size_t i = 0; i < kept.size(); ++i) expect_close(g_got[i], g_ref[i], 5e-2, names[i]);
}

// Under no_grad the scan still runs the kernels (and keeps no chunk states).
TEST(Mamba1CudaInference, NoGradEqualsReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(4);
  Inputs in = make_inputs({3, 200, 50, 16, true, true, true, true, torch::kFloat32});
  torch::NoGradGuard ng;
  auto got = m1::selective_scan(in.args);
  auto ref = m1::reference::selective_scan(in.args);
  EXPECT_FALSE(got.y.requires_grad());
  expect_close(got.y, ref.y, 1e-4, "y");
  expect_close(got.final_state, ref.final_state, 1e-4, "final_state");
}

// The decoding step against the reference step; the state is updated in place.
TEST(Mamba1CudaStep, StepEqualsReference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(5);
  auto o = torch::TensorOptions().device(kCuda);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16})
    for (int64_t N : {16, 64}) {
      const int64_t B = 3, D = 37;
      std::printf("step %s N%ld\n", dtype == torch::kFloat32 ? "fp32" : "bf16", N);
      torch::NoGradGuard ng;
      m1::StepArgs a;
      a.state = torch::randn({B, D, N}, o);
      a.u = torch::randn({B, D}, o).to(dtype);
      a.delta = (torch::randn({B, D}, o) * 0.5 - 1.0).to(dtype);
      a.z = torch::randn({B, D}, o).to(dtype);
      a.A_log = torch::log(torch::arange(1, N + 1, o)).repeat({D, 1});
      a.B = torch::randn({B, N}, o).to(dtype);
      a.C = torch::randn({B, N}, o).to(dtype);
      a.D = torch::randn({D}, o);
      m1::StepArgs r = a;
      r.state = a.state.clone();
      const auto* before = a.state.data_ptr();
      auto y = m1::selective_scan_step(a);
      auto y_ref = m1::reference::selective_scan_step(r);
      EXPECT_EQ(a.state.data_ptr(), before) << "state updated in place";
      expect_close(y, y_ref, 1e-5, "y");
      expect_close(a.state, r.state, 1e-5, "state");
    }
}

}  // namespace
