// The Mamba-1 reference selective scan against the plain recurrence written out element by element
// in float64 (the definition of the S6 layer), including sequence-id resets, initial states,
// the D skip, the z gate, gradients, and the decoding step.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "peftfw/kernels/mamba1.hpp"

namespace ops = peftfw::kernels::mamba1;

namespace {

struct Inputs {
  torch::Tensor u, delta, A_log, B, C, D, z, init, seq;
};

Inputs make_inputs(int64_t Bsz, int64_t T, int64_t Dm, int64_t N, bool ids) {
  torch::manual_seed(11);
  Inputs in;
  in.u = torch::randn({Bsz, T, Dm});
  in.delta = torch::randn({Bsz, T, Dm}) - 1.0;
  in.A_log = torch::log(torch::arange(1, N + 1, torch::kFloat32)).expand({Dm, N}) + 0.2 * torch::randn({Dm, N});
  in.B = torch::randn({Bsz, T, N});
  in.C = torch::randn({Bsz, T, N});
  in.D = torch::randn({Dm});
  in.z = torch::randn({Bsz, T, Dm});
  in.init = torch::randn({Bsz, Dm, N});
  if (ids) {
    in.seq = torch::zeros({Bsz, T}, torch::kLong);
    for (int64_t b = 0; b < Bsz; ++b)
      for (int64_t t = 0; t < T; ++t) in.seq[b][t] = (t >= 4) + (t >= 9 + b) + (t >= 15);
  }
  return in;
}

double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
double silu(double x) { return x / (1.0 + std::exp(-x)); }

// h[t,d,n] = exp(dt A[d,n]) h[t-1,d,n] + dt B[t,n] u[t,d], reset to 0 where a new sequence starts;
// y[t,d] = (sum_n h[t,d,n] C[t,n] + D[d] u[t,d]) silu(z[t,d]). Scalar float64 loops.
std::pair<torch::Tensor, torch::Tensor> naive_scan(const Inputs& in, bool use_init, bool use_D, bool use_z) {
  auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat64).contiguous(); };
  auto u = f(in.u), delta = f(in.delta), A_log = f(in.A_log), Bm = f(in.B), Cm = f(in.C), Dv = f(in.D), z = f(in.z),
       init = f(in.init);
  const int64_t Bsz = u.size(0), T = u.size(1), Dm = u.size(2), N = A_log.size(1);
  auto y = torch::zeros({Bsz, T, Dm}, torch::kFloat64), last = torch::zeros({Bsz, Dm, N}, torch::kFloat64);
  auto U = u.accessor<double, 3>(), DL = delta.accessor<double, 3>(), BB = Bm.accessor<double, 3>(),
       CC = Cm.accessor<double, 3>(), Z = z.accessor<double, 3>(), I = init.accessor<double, 3>(),
       Y = y.accessor<double, 3>(), L = last.accessor<double, 3>();
  auto AL = A_log.accessor<double, 2>();
  auto DV = Dv.accessor<double, 1>();
  for (int64_t b = 0; b < Bsz; ++b)
    for (int64_t d = 0; d < Dm; ++d) {
      std::vector<double> h(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) h[static_cast<size_t>(n)] = use_init ? I[b][d][n] : 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const bool reset = in.seq.defined() && t > 0 && in.seq[b][t].item<int64_t>() != in.seq[b][t - 1].item<int64_t>();
        const double dt = softplus(DL[b][t][d]);
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          auto& s = h[static_cast<size_t>(n)];
          s = (reset ? 0.0 : std::exp(-dt * std::exp(AL[d][n])) * s) + dt * BB[b][t][n] * U[b][t][d];
          acc += s * CC[b][t][n];
        }
        if (use_D) acc += DV[d] * U[b][t][d];
        Y[b][t][d] = use_z ? acc * silu(Z[b][t][d]) : acc;
      }
      for (int64_t n = 0; n < N; ++n) L[b][d][n] = h[static_cast<size_t>(n)];
    }
  return {y, last};
}

ops::ScanArgs args_of(const Inputs& in, bool use_init, bool use_D, bool use_z, bool ids) {
  ops::ScanArgs a;
  a.u = in.u;
  a.delta = in.delta;
  a.A_log = in.A_log;
  a.B = in.B;
  a.C = in.C;
  if (use_D) a.D = in.D;
  if (use_z) a.z = in.z;
  if (use_init) a.initial_state = in.init;
  if (ids) a.seq_ids = in.seq;
  return a;
}

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>() /
         std::max(b.abs().max().item<double>(), 1e-30);
}

}  // namespace

TEST(Mamba1Reference, ScanEqualsFloat64Recurrence) {
  struct Case {
    bool init, D, z, ids;
  };
  for (const auto& c : {Case{false, true, true, false}, Case{true, true, true, false}, Case{true, false, false, true},
                        Case{false, true, false, true}, Case{true, true, true, true}}) {
    auto in = make_inputs(2, 21, 6, 5, c.ids);
    auto res = ops::reference::selective_scan(args_of(in, c.init, c.D, c.z, c.ids));
    auto [y, last] = naive_scan(in, c.init, c.D, c.z);
    EXPECT_EQ(res.y.scalar_type(), torch::kFloat32);
    EXPECT_LE(rel(res.y, y), 1e-5) << "init " << c.init << " D " << c.D << " z " << c.z << " ids " << c.ids;
    EXPECT_LE(rel(res.final_state, last), 1e-5);
  }
}

// Gradients of the reference (autograd through float32 ops) equal those of the float64 recurrence
// built from the same scalar formula with autograd, for every input.
TEST(Mamba1Reference, GradientsEqualFloat64Recurrence) {
  auto in = make_inputs(2, 13, 4, 3, true);
  auto leaf = [](const torch::Tensor& t, torch::Dtype dt) { return t.to(dt).detach().requires_grad_(true); };
  auto run = [&](torch::Dtype dt) {
    Inputs v = in;
    v.u = leaf(in.u, dt), v.delta = leaf(in.delta, dt), v.A_log = leaf(in.A_log, dt), v.B = leaf(in.B, dt);
    v.C = leaf(in.C, dt), v.D = leaf(in.D, dt), v.z = leaf(in.z, dt), v.init = leaf(in.init, dt);
    torch::Tensor y, last;
    if (dt == torch::kFloat32) {
      auto r = ops::reference::selective_scan(args_of(v, true, true, true, true));
      y = r.y, last = r.final_state;
    } else {
      // float64: the recurrence token by token with tensor ops (autograd), resets by the ids.
      const int64_t T = v.u.size(1);
      auto h = v.init;
      std::vector<torch::Tensor> ys;
      for (int64_t t = 0; t < T; ++t) {
        auto dtt = torch::nn::functional::softplus(v.delta.select(1, t));  // [B,D]
        auto decay = torch::exp(-dtt.unsqueeze(-1) * torch::exp(v.A_log));
        if (t > 0) decay = decay * in.seq.select(1, t).eq(in.seq.select(1, t - 1)).to(dt).view({-1, 1, 1});
        h = decay * h + (dtt * v.u.select(1, t)).unsqueeze(-1) * v.B.select(1, t).unsqueeze(1);
        auto yt = (h * v.C.select(1, t).unsqueeze(1)).sum(-1) + v.D * v.u.select(1, t);
        ys.push_back(yt * torch::sigmoid(v.z.select(1, t)) * v.z.select(1, t));
      }
      y = torch::stack(ys, 1), last = h;
    }
    torch::manual_seed(3);
    auto gy = torch::randn(y.sizes(), torch::kFloat64).to(dt), gl = torch::randn(last.sizes(), torch::kFloat64).to(dt);
    ((y * gy).sum() + (last * gl).sum()).backward();
    return std::vector<torch::Tensor>{v.u.grad(), v.delta.grad(), v.A_log.grad(), v.B.grad(), v.C.grad(),
                                      v.D.grad(), v.z.grad(), v.init.grad()};
  };
  auto got = run(torch::kFloat32), want = run(torch::kFloat64);
  const char* names[] = {"u", "delta", "A_log", "B", "C", "D", "z", "initial_state"};
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << names[i];
    EXPECT_LE(rel(got[i], want[i]), 1e-4) << "gradient of " << names[i];
  }
}

// Decoding token by token with the step equals the scan over the whole sequence.
TEST(Mamba1Reference, StepsEqualScan) {
  auto in = make_inputs(2, 9, 5, 4, false);
  auto full = ops::reference::selective_scan(args_of(in, true, true, true, false));
  auto state = in.init.clone();
  for (int64_t t = 0; t < 9; ++t) {
    ops::StepArgs s;
    s.state = state;
    s.u = in.u.select(1, t);
    s.delta = in.delta.select(1, t);
    s.A_log = in.A_log;
    s.B = in.B.select(1, t);
    s.C = in.C.select(1, t);
    s.D = in.D;
    s.z = in.z.select(1, t);
    auto y = ops::selective_scan_step(s);
    state = s.state;
    EXPECT_LE(rel(y, full.y.select(1, t)), 1e-6) << "step " << t;
  }
  EXPECT_LE(rel(state, full.final_state), 1e-6);
}

// The packed rows' resets: a row of two sequences equals the two sequences scanned alone.
TEST(Mamba1Reference, ResetsEqualSeparateSequences) {
  auto in = make_inputs(1, 12, 3, 4, false);
  in.seq = torch::cat({torch::zeros({1, 5}, torch::kLong), torch::ones({1, 7}, torch::kLong)}, 1);
  auto packed = ops::reference::selective_scan(args_of(in, false, true, true, true));
  auto part = [&](int64_t from, int64_t len) {
    Inputs p = in;
    for (auto* t : {&p.u, &p.delta, &p.B, &p.C, &p.z}) *t = t->narrow(1, from, len);
    return ops::reference::selective_scan(args_of(p, false, true, true, false)).y;
  };
  auto want = torch::cat({part(0, 5), part(5, 7)}, 1);
  EXPECT_LE(rel(packed.y, want), 1e-6);
  auto leaky = ops::reference::selective_scan(args_of(in, false, true, true, false)).y;
  EXPECT_GT(rel(leaky, want), 1e-3);
}
