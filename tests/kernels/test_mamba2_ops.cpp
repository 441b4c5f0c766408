// The chunked Mamba-2 reference ops against the plain per-step recurrence
// (the definition of the SSM, computed token by token in float64), including
// sequence-id resets, initial states, groups and gradients.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/ops.hpp"
#include "peftfw/kernels/ssd_fused.hpp"

namespace ops = peftfw::kernels::mamba2;
namespace kernels = peftfw::kernels;

namespace {

struct Inputs {
  torch::Tensor x, dt, A_log, B, C, D, dt_bias, init, seq;
};

Inputs make_inputs(int64_t Bsz, int64_t T, int64_t H, int64_t P, int64_t G, int64_t N, bool ids) {
  torch::manual_seed(7);
  Inputs in;
  in.x = torch::randn({Bsz, T, H, P});
  in.dt = torch::randn({Bsz, T, H}) * 0.5;
  in.A_log = torch::log(torch::linspace(0.05, 1.0, H)) + 0.1 * torch::randn({H});
  in.B = torch::randn({Bsz, T, G, N});
  in.C = torch::randn({Bsz, T, G, N});
  in.D = torch::randn({H});
  in.dt_bias = torch::randn({H}) * 0.3;
  in.init = torch::randn({Bsz, H, P, N});
  if (ids) {
    in.seq = torch::zeros({Bsz, T}, torch::kLong);
    for (int64_t b = 0; b < Bsz; ++b)
      for (int64_t t = 0; t < T; ++t) in.seq[b][t] = (t >= 5) + (t >= 13 + b) + (t >= 16) + (t >= 29 + b);
  }
  return in;
}

// The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t, in float64.
std::pair<torch::Tensor, torch::Tensor> naive_scan(const Inputs& in, double dt_min, double dt_max) {
  auto d = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kFloat64) : t; };
  auto x = d(in.x), B = d(in.B), C = d(in.C);
  const int64_t Bsz = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3), G = B.size(2),
                N = B.size(3);
  auto dt = torch::clamp(torch::softplus(d(in.dt) + d(in.dt_bias)), dt_min, dt_max);
  auto A = -torch::exp(d(in.A_log));
  auto h = in.init.defined() ? d(in.init) : torch::zeros({Bsz, H, P, N}, torch::kFloat64);
  std::vector<torch::Tensor> ys;
  for (int64_t t = 0; t < T; ++t) {
    if (in.seq.defined() && t > 0) {
      auto reset = in.seq.select(1, t).ne(in.seq.select(1, t - 1)).to(torch::kFloat64);
      h = h * (1 - reset).view({Bsz, 1, 1, 1});
    }
    auto dA = torch::exp(dt.select(1, t) * A).view({Bsz, H, 1, 1});
    auto Bt = B.select(1, t).repeat_interleave(H / G, 1);  // [B,H,N]
    auto Ct = C.select(1, t).repeat_interleave(H / G, 1);
    auto xt = x.select(1, t);                                // [B,H,P]
    h = h * dA + (dt.select(1, t).unsqueeze(-1) * xt).unsqueeze(-1) * Bt.unsqueeze(2);
    ys.push_back(torch::einsum("bhpn,bhn->bhp", {h, Ct}) + d(in.D).view({1, H, 1}) * xt);
  }
  return {torch::stack(ys, 1), h};
}

ops::SsdArgs args_of(const Inputs& in, int64_t chunk) {
  ops::SsdArgs a;
  a.x = in.x;
  a.dt = in.dt;
  a.A_log = in.A_log;
  a.B = in.B;
  a.C = in.C;
  a.D = in.D;
  a.dt_bias = in.dt_bias;
  a.initial_state = in.init;
  a.seq_ids = in.seq;
  a.chunk_size = chunk;
  return a;
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

struct Shape {
  int64_t T, chunk, G;
  bool ids;
  bool fused = false;  // the hand-written-backward fast path instead of the reference
};

class SsdVsRecurrence : public ::testing::TestWithParam<Shape> {};

TEST_P(SsdVsRecurrence, OutputsFinalStateAndGradients) {
  const auto s = GetParam();
  auto in = make_inputs(2, s.T, 4, 8, s.G, 16, s.ids);
  // The final state carried by the chunked scan includes only the last sequence's history;
  // with ids the naive scan resets at the same places, so they must agree either way.
  for (auto* t : {&in.x, &in.dt, &in.A_log, &in.B, &in.C, &in.D, &in.dt_bias, &in.init})
    t->set_requires_grad(true);
  auto res = s.fused ? ops::fused::ssd_chunk_scan(args_of(in, s.chunk), s.chunk)
                     : ops::ssd_chunk_scan(args_of(in, s.chunk));
  auto [y_ref, h_ref] = naive_scan(in, 0.0, std::numeric_limits<double>::infinity());
  EXPECT_LE(max_abs(res.y.to(torch::kFloat64) - y_ref), 1e-4 * max_abs(y_ref));
  EXPECT_LE(max_abs(res.final_state.to(torch::kFloat64) - h_ref), 1e-4 * max_abs(h_ref));

  auto w = torch::randn(res.y.sizes(), torch::kFloat64);
  auto grads = torch::autograd::grad({(res.y.to(torch::kFloat64) * w).sum()},
                                     {in.x, in.dt, in.A_log, in.B, in.C, in.D, in.dt_bias, in.init});
  auto grads_ref = torch::autograd::grad({(y_ref * w).sum()},
                                         {in.x, in.dt, in.A_log, in.B, in.C, in.D, in.dt_bias, in.init});
  const char* names[] = {"x", "dt", "A_log", "B", "C", "D", "dt_bias", "initial_state"};
  for (size_t i = 0; i < grads.size(); ++i) {
    ASSERT_FALSE(torch::isnan(grads[i]).any().item<bool>()) << names[i];
    EXPECT_LE(max_abs(grads[i].to(torch::kFloat64) - grads_ref[i]), 1e-4 * max_abs(grads_ref[i]))
        << "gradient of " << names[i];
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, SsdVsRecurrence,
                         ::testing::Values(Shape{21, 8, 1, false}, Shape{21, 8, 2, false},
                                           Shape{5, 8, 1, false}, Shape{16, 8, 1, false},
                                           Shape{21, 8, 2, true}, Shape{21, 4, 1, true},
                                           Shape{21, 16, 1, false, true}, Shape{21, 16, 2, false, true},
                                           Shape{5, 16, 1, false, true}, Shape{32, 16, 1, false, true},
                                           Shape{21, 16, 2, true, true}, Shape{40, 16, 1, true, true}));

TEST(Ssd, TimeStepLimitClamps) {
  auto in = make_inputs(1, 12, 4, 8, 1, 16, false);
  auto a = args_of(in, 8);
  a.dt_min = 0.2;
  a.dt_max = 0.6;
  auto res = ops::ssd_chunk_scan(a);
  auto [y_ref, h_ref] = naive_scan(in, 0.2, 0.6);
  EXPECT_LE(max_abs(res.y.to(torch::kFloat64) - y_ref), 1e-4 * max_abs(y_ref));
}

TEST(Ssd, StepEqualsScan) {
  auto in = make_inputs(2, 9, 4, 8, 2, 16, false);
  auto full = ops::ssd_chunk_scan(args_of(in, 4));
  ops::SsdStepArgs st;
  st.state = in.init.clone();
  st.A_log = in.A_log;
  st.D = in.D;
  st.dt_bias = in.dt_bias;
  for (int64_t t = 0; t < 9; ++t) {
    st.x = in.x.select(1, t);
    st.dt = in.dt.select(1, t);
    st.B = in.B.select(1, t);
    st.C = in.C.select(1, t);
    auto y = ops::ssd_step(st);
    EXPECT_LE(max_abs(y - full.y.select(1, t)), 1e-4 * max_abs(full.y)) << "step " << t;
  }
  EXPECT_LE(max_abs(st.state - full.final_state), 1e-4 * max_abs(full.final_state));
}

TEST(Conv1d, SequenceIdsStopTheWindowAtBoundaries) {
  torch::manual_seed(3);
  auto x = torch::randn({1, 12, 6});
  auto w = torch::randn({6, 4});
  auto b = torch::randn({6});
  auto seq = torch::cat({torch::zeros({5}, torch::kLong), torch::ones({7}, torch::kLong)}).unsqueeze(0);
  auto packed = kernels::causal_conv1d(x, w, b, seq, true);
  auto first = kernels::causal_conv1d(x.narrow(1, 0, 5), w, b, torch::Tensor(), true);
  auto second = kernels::causal_conv1d(x.narrow(1, 5, 7), w, b, torch::Tensor(), true);
  EXPECT_LE(max_abs(packed - torch::cat({first, second}, 1)), 1e-6);
  // Same ids everywhere == the plain convolution.
  auto same = kernels::causal_conv1d(x, w, b, torch::zeros({1, 12}, torch::kLong), true);
  EXPECT_LE(max_abs(same - kernels::causal_conv1d(x, w, b, torch::Tensor(), true)), 1e-6);
}

TEST(Conv1d, StepEqualsFullConvolution) {
  torch::manual_seed(4);
  auto x = torch::randn({2, 7, 6});
  auto w = torch::randn({6, 4});
  auto b = torch::randn({6});
  auto full = kernels::causal_conv1d(x, w, b, torch::Tensor(), true);
  auto state = torch::zeros({2, 6, 4});
  for (int64_t t = 0; t < 7; ++t) {
    auto y = kernels::causal_conv1d_step(state, x.select(1, t), w, b, true);
    EXPECT_LE(max_abs(y - full.select(1, t)), 1e-6) << "step " << t;
  }
}

TEST(GatedNorm, NormalisesOverAllChannelsAfterGating) {
  auto y = torch::tensor({{1.0, -2.0, 3.0, 0.5}});
  auto z = torch::tensor({{0.0, 1.0, -1.0, 2.0}});
  auto w = torch::tensor({1.0, 2.0, 0.5, 1.0});
  auto out = kernels::gated_rms_norm(y, z, w, 1e-6);
  // By hand: g = y * z * sigmoid(z); out = w * g / sqrt(mean(g^2) + eps)
  std::vector<double> g;
  double ms = 0;
  for (int i = 0; i < 4; ++i) {
    const double zi = z[0][i].item<double>();
    g.push_back(y[0][i].item<double>() * zi / (1 + std::exp(-zi)));
    ms += g.back() * g.back() / 4;
  }
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(out[0][i].item<double>(), w[i].item<double>() * g[i] / std::sqrt(ms + 1e-6), 1e-5);
}

}  // namespace
