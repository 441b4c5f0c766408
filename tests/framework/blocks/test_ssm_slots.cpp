// The SSM mixers' state and parameter slots (peftfw/blocks/ssm_slots.hpp) against a hand-written
// float64 recurrence: a learned initial state (and conv window), a state offset and an output
// offset, on one sequence per row (the scan's own initial state), packed rows (each sequence
// starts from the learned state) and left padding, through prefill and decoding; gradients
// against central finite differences of the float64 recurrence.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/blocks/context.hpp"
#include "peftfw/blocks/mamba1_mixer.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/ssm_slots.hpp"

using namespace peftfw;
using namespace peftfw::blocks;
using torch::Tensor;

namespace {

Tensor f64(const Tensor& t) { return t.detach().to(torch::kFloat64); }
Tensor ref_silu(const Tensor& t) { return t * torch::sigmoid(t); }
Tensor ref_softplus(const Tensor& t) { return torch::log1p(torch::exp(t)); }
double scalar(const Tensor& t) { return t.item<double>(); }
double max_abs(const Tensor& t) { return scalar(t.abs().max()); }

struct Terms {
  Tensor h0, window, state_offset, output_offset;  // float64, any may be undefined
};

class FixedState final : public SsmStateAdapter {
 public:
  SsmStateTerms t;
  SsmStateTerms terms() const override { return t; }
};

// Where each token's sequence starts (-1: none yet), as a reader of the batch would say it: a new
// sequence at t = 0 and where the id changes; with a padding mask, at the first token after pads.
std::vector<int64_t> starts_of(int64_t b, int64_t T, const Tensor& seq, const Tensor& mask) {
  std::vector<int64_t> start(T, -1);
  int64_t cur = -1;
  for (int64_t t = 0; t < T; ++t) {
    bool s;
    if (seq.defined()) s = t == 0 || seq[b][t].item<int64_t>() != seq[b][t - 1].item<int64_t>();
    else if (mask.defined()) s = mask[b][t].item<double>() > 0.5 && (t == 0 || mask[b][t - 1].item<double>() < 0.5);
    else s = t == 0;
    if (s) cur = t;
    start[t] = cur;
  }
  return start;
}

// The causal depthwise conv of x [T,C] with weight [C,K], bias [C]: inputs before a token's
// sequence start are the learned window (its last column right before the start) or zero.
Tensor conv_oracle(const Tensor& x, const Tensor& w, const Tensor& bias, const std::vector<int64_t>& start,
                   const Tensor& window) {
  const int64_t T = x.size(0), K = w.size(1);
  std::vector<Tensor> out;
  for (int64_t t = 0; t < T; ++t) {
    auto acc = bias.defined() ? bias.clone() : torch::zeros({w.size(0)}, x.options());
    for (int64_t k = 0; k < K; ++k) {
      const int64_t pos = t - (K - 1) + k;
      if (start[t] >= 0 && pos >= start[t]) {
        acc = acc + w.select(1, k) * x[pos];
      } else if (start[t] < 0 && pos >= 0) {
        acc = acc + w.select(1, k) * x[pos];  // pads ahead of any sequence (zero inputs anyway)
      } else if (start[t] >= 0 && window.defined()) {
        const int64_t v = (K - 1) + pos - start[t];
        if (v >= 0) acc = acc + w.select(1, k) * window.select(1, v);
      }
    }
    out.push_back(acc);
  }
  return torch::stack(out);
}

// ---- Mamba-1 ----

Mamba1MixerOptions m1_options() {
  Mamba1MixerOptions o;
  o.hidden_size = 12;
  o.inner = 8;
  o.state_size = 4;
  o.conv_kernel = 4;
  o.dt_rank = 3;
  return o;
}

void randomize(torch::nn::Module& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& p : m.named_parameters()) {
    const auto& name = p.key();
    auto& v = p.value();
    if (name == "A_log") v.copy_(torch::log(torch::rand_like(v) * 3 + 0.5));
    else if (name.find("dt") != std::string::npos && name.find("bias") != std::string::npos) v.copy_(torch::randn_like(v) * 0.5 - 0.5);
    else if (name == "norm.weight") v.copy_(1 + 0.2 * torch::randn_like(v));
    else v.copy_(torch::randn_like(v) * 0.4);
  }
}

// The mixer's output [B,T,hidden] in float64, by the recurrence token by token.
Tensor m1_oracle(Mamba1MixerImpl& m, const Tensor& h, const Terms& s, const Tensor& seq, const Tensor& mask) {
  const auto& o = m.options();
  const int64_t B = h.size(0), T = h.size(1), Di = o.inner, N = o.state_size, R = o.dt_rank;
  auto Win = f64(m.in_proj->weight), Wx = f64(m.x_proj->weight), Wdt = f64(m.dt_proj->weight),
       bdt = f64(m.dt_proj->bias), Wout = f64(m.out_proj->weight), cw = f64(m.conv1d->weight).squeeze(1),
       cb = f64(m.conv1d->bias), A = -torch::exp(f64(m.A_log)), Dv = f64(m.D);
  std::vector<Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    auto hb = f64(h[b]);
    if (mask.defined()) hb = hb * f64(mask[b]).unsqueeze(-1);
    auto xz = hb.matmul(Win.t());
    auto x = xz.narrow(1, 0, Di), z = xz.narrow(1, Di, Di);
    const auto start = starts_of(b, T, seq, mask);
    auto u = ref_silu(conv_oracle(x, cw, cb, start, s.window));
    if (mask.defined()) u = u * f64(mask[b]).unsqueeze(-1);
    auto state = torch::zeros({Di, N}, torch::kFloat64);
    std::vector<Tensor> ys;
    for (int64_t t = 0; t < T; ++t) {
      if (start[t] == t) state = s.h0.defined() ? s.h0.clone() : torch::zeros({Di, N}, torch::kFloat64);
      auto parts = u[t].matmul(Wx.t());
      auto dt = ref_softplus(parts.narrow(0, 0, R).matmul(Wdt.t()) + bdt);  // [Di]
      auto Bv = parts.narrow(0, R, N), Cv = parts.narrow(0, R + N, N);
      state = torch::exp(dt.unsqueeze(1) * A) * state + dt.unsqueeze(1) * Bv.unsqueeze(0) * u[t].unsqueeze(1);
      auto read = s.state_offset.defined() ? state + s.state_offset : state;
      auto y = read.matmul(Cv) + Dv * u[t];
      if (s.output_offset.defined()) y = y + s.output_offset;
      ys.push_back((y * ref_silu(z[t])).matmul(Wout.t()));
    }
    rows.push_back(torch::stack(ys));
  }
  return torch::stack(rows);
}

// ---- Mamba-2 ----

Mamba2MixerOptions m2_options() {
  Mamba2MixerOptions o;
  o.hidden_size = 16;
  o.num_heads = 4;
  o.head_dim = 4;
  o.n_groups = 2;
  o.state_size = 4;
  o.conv_kernel = 4;
  o.chunk_size = 4;
  return o;
}

Tensor m2_oracle(Mamba2MixerImpl& m, const Tensor& h, const Terms& s, const Tensor& seq, const Tensor& mask) {
  const auto& o = m.options();
  const int64_t B = h.size(0), T = h.size(1), H = o.num_heads, P = o.head_dim, G = o.n_groups, N = o.state_size;
  const int64_t Im = o.inner(), CD = o.conv_dim();
  auto Win = f64(m.in_proj->weight), Wout = f64(m.out_proj->weight), cw = f64(m.conv1d->weight).squeeze(1),
       cb = f64(m.conv1d->bias), A = -torch::exp(f64(m.A_log)), Dv = f64(m.D), dtb = f64(m.dt_bias),
       nw = f64(m.norm->weight);
  std::vector<Tensor> rows;
  for (int64_t b = 0; b < B; ++b) {
    auto hb = f64(h[b]);
    if (mask.defined()) hb = hb * f64(mask[b]).unsqueeze(-1);
    auto proj = hb.matmul(Win.t());
    auto z = proj.narrow(1, 0, Im), xBC = proj.narrow(1, Im, CD), dtr = proj.narrow(1, Im + CD, H);
    const auto start = starts_of(b, T, seq, mask);
    auto act = ref_silu(conv_oracle(xBC, cw, cb, start, s.window));
    if (mask.defined()) act = act * f64(mask[b]).unsqueeze(-1);
    auto state = torch::zeros({H, P, N}, torch::kFloat64);
    std::vector<Tensor> ys;
    for (int64_t t = 0; t < T; ++t) {
      if (start[t] == t) state = s.h0.defined() ? s.h0.clone() : torch::zeros({H, P, N}, torch::kFloat64);
      auto x = act[t].narrow(0, 0, Im).reshape({H, P});
      auto Bv = act[t].narrow(0, Im, G * N).reshape({G, N}).repeat_interleave(H / G, 0);       // [H,N]
      auto Cv = act[t].narrow(0, Im + G * N, G * N).reshape({G, N}).repeat_interleave(H / G, 0);
      auto dt = ref_softplus(dtr[t] + dtb);  // [H]
      state = torch::exp(dt * A).view({H, 1, 1}) * state + (dt.view({H, 1}) * x).unsqueeze(-1) * Bv.unsqueeze(1);
      auto read = s.state_offset.defined() ? state + s.state_offset : state;
      auto y = (read * Cv.unsqueeze(1)).sum(-1) + Dv.view({H, 1}) * x;  // [H,P]
      if (s.output_offset.defined()) y = y + s.output_offset;
      auto g = y.reshape({Im}) * ref_silu(z[t]);
      g = g * torch::rsqrt(g.pow(2).mean() + o.norm_eps) * nw;
      ys.push_back(g.matmul(Wout.t()));
    }
    rows.push_back(torch::stack(ys));
  }
  return torch::stack(rows);
}

// ---- cases ----

struct Layout {
  std::vector<int64_t> state;  // per-sequence state shape
  int64_t conv_channels, K;
};

Terms random_terms(const Layout& l, bool init, bool window, bool state_off, bool out_off, uint64_t seed) {
  torch::manual_seed(seed);
  Terms s;
  auto o = torch::TensorOptions().dtype(torch::kFloat64);
  if (init) s.h0 = torch::randn(l.state, o) * 0.7;
  if (window) s.window = torch::randn({l.conv_channels, l.K - 1}, o) * 0.7;
  if (state_off) s.state_offset = torch::randn(l.state, o) * 0.5;
  auto out_shape = l.state;
  out_shape.pop_back();
  if (out_off) s.output_offset = torch::randn(out_shape, o) * 0.5;
  return s;
}

std::shared_ptr<FixedState> adapter_of(const Terms& s) {
  auto a = std::make_shared<FixedState>();
  auto f32 = [](const Tensor& t) { return t.defined() ? t.to(torch::kFloat32).requires_grad_(true) : Tensor(); };
  a->t.initial_state = f32(s.h0);
  a->t.initial_conv = f32(s.window);
  a->t.state_offset = f32(s.state_offset);
  a->t.output_offset = f32(s.output_offset);
  return a;
}

// The batch variants: one sequence per row; packed rows; left padding.
struct Batch {
  const char* what;
  Tensor seq, mask;
};

std::vector<Batch> batches(int64_t B, int64_t T) {
  auto seq = torch::zeros({B, T}, torch::kLong);
  seq.index_put_({0, torch::indexing::Slice(4, 9)}, 1);
  seq.index_put_({0, torch::indexing::Slice(9, T)}, 2);
  seq.index_put_({1, torch::indexing::Slice(2, T)}, 5);
  auto mask = torch::ones({B, T});
  mask.index_put_({0, torch::indexing::Slice(0, 3)}, 0.0);
  mask.index_put_({1, torch::indexing::Slice(0, 1)}, 0.0);
  return {{"one sequence per row", {}, {}}, {"packed", seq, {}}, {"left padded", {}, mask}};
}

// Positions whose output means something (not pads).
Tensor real_positions(const Batch& b, int64_t B, int64_t T) {
  return b.mask.defined() ? b.mask.to(torch::kBool) : torch::ones({B, T}, torch::kBool);
}

template <typename Mixer>
void expect_equals_oracle(Mixer& m, const Layout& l,
                          Tensor (*oracle)(std::remove_reference_t<decltype(*m)>&, const Tensor&, const Terms&,
                                           const Tensor&, const Tensor&)) {
  const int64_t B = 2, T = 12;
  torch::manual_seed(7);
  auto h = torch::randn({B, T, m->options().hidden_size});
  for (int combo = 0; combo < 4; ++combo) {
    // all terms at once; the initial state alone; the state offset alone; the output offset alone
    const Terms s = random_terms(l, combo == 0 || combo == 1, combo == 0, combo == 0 || combo == 2,
                                 combo == 0 || combo == 3, 100 + combo);
    m->set_state_adapter(adapter_of(s));
    for (const auto& b : batches(B, T)) {
      ForwardContext ctx;
      ctx.seq_ids = b.seq;
      ctx.ssm_mask = b.mask;
      auto got = m->forward(h, ctx, nullptr).detach().to(torch::kFloat64);
      auto want = oracle(*m, h, s, b.seq, b.mask);
      auto keep = real_positions(b, B, T).unsqueeze(-1);
      auto err = max_abs((got - want) * keep);
      EXPECT_LT(err, 2e-5 * max_abs(want) + 1e-6) << b.what << ", terms combo " << combo;
      // The terms matter (the check above could not pass with them ignored).
      m->set_state_adapter(nullptr);
      auto plain = m->forward(h, ctx, nullptr).detach().to(torch::kFloat64);
      m->set_state_adapter(adapter_of(s));
      EXPECT_GT(max_abs((plain - want) * keep), 1e-3) << b.what << ", terms combo " << combo;
    }
  }
  m->set_state_adapter(nullptr);
}

// Prefill T tokens into a cache, then decode one more: the decoded output equals the recurrence
// over T+1 tokens (the learned state reaches the cache through the final state and conv window).
template <typename Mixer>
void expect_decode_continues(Mixer& m, const Layout& l,
                             Tensor (*oracle)(std::remove_reference_t<decltype(*m)>&, const Tensor&, const Terms&,
                                              const Tensor&, const Tensor&)) {
  const int64_t B = 2, T = 12;
  torch::manual_seed(8);
  auto h = torch::randn({B, T + 1, m->options().hidden_size});
  const Terms s = random_terms(l, true, true, true, true, 200);
  m->set_state_adapter(adapter_of(s));
  for (const auto& b : batches(B, T + 1)) {
    auto cut = [&](const Tensor& t) { return t.defined() ? t.narrow(1, 0, T) : t; };
    ForwardContext ctx;
    ctx.seq_ids = cut(b.seq);
    ctx.ssm_mask = cut(b.mask);
    LayerCache cache;
    torch::NoGradGuard ng;
    m->forward(h.narrow(1, 0, T), ctx, &cache);
    ForwardContext step;
    step.decode_step = true;
    auto got = m->forward(h.narrow(1, T, 1), step, &cache).to(torch::kFloat64).select(1, 0);
    auto want = oracle(*m, h, s, b.seq, b.mask).select(1, T);
    EXPECT_LT(max_abs(got - want), 2e-5 * max_abs(want) + 1e-6) << b.what;
  }
  m->set_state_adapter(nullptr);
}

// d loss / d (each learned term) by autograd through the mixer (float32) equals central finite
// differences of the float64 recurrence, on packed rows and on one sequence per row.
template <typename Mixer>
void expect_gradients_match_finite_differences(
    Mixer& m, const Layout& l,
    Tensor (*oracle)(std::remove_reference_t<decltype(*m)>&, const Tensor&, const Terms&, const Tensor&,
                     const Tensor&)) {
  const int64_t B = 2, T = 12;
  torch::manual_seed(9);
  auto h = torch::randn({B, T, m->options().hidden_size});
  auto weights = torch::randn({B, T, m->options().hidden_size}, torch::kFloat64);
  Terms s = random_terms(l, true, true, true, true, 300);
  for (const auto& b : batches(B, T)) {
    if (b.mask.defined()) continue;
    auto a = adapter_of(s);
    m->set_state_adapter(a);
    ForwardContext ctx;
    ctx.seq_ids = b.seq;
    (m->forward(h, ctx, nullptr).to(torch::kFloat64) * weights).sum().backward();
    struct Item {
      const char* name;
      Tensor Terms::*member;
      Tensor grad;
    };
    std::vector<Item> items = {{"initial_state", &Terms::h0, a->t.initial_state.grad()},
                               {"initial_conv", &Terms::window, a->t.initial_conv.grad()},
                               {"state_offset", &Terms::state_offset, a->t.state_offset.grad()},
                               {"output_offset", &Terms::output_offset, a->t.output_offset.grad()}};
    for (auto& it : items) {
      ASSERT_TRUE(it.grad.defined()) << it.name;
      auto flat_grad = it.grad.to(torch::kFloat64).reshape({-1});
      const double scale = max_abs(flat_grad);
      ASSERT_GT(scale, 0) << it.name;
      const int64_t n = (s.*it.member).numel();
      for (int64_t k = 0; k < n; k += std::max<int64_t>(1, n / 7)) {
        const double eps = 1e-6;
        auto loss_at = [&](double delta) {
          Terms p = s;
          p.*it.member = (s.*it.member).clone();
          (p.*it.member).view({-1})[k] += delta;
          return scalar((oracle(*m, h, p, b.seq, b.mask) * weights).sum());
        };
        const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
        EXPECT_NEAR(scalar(flat_grad[k]), fd, 2e-4 * scale + 1e-6) << it.name << "[" << k << "], " << b.what;
      }
    }
  }
  m->set_state_adapter(nullptr);
}

}  // namespace

TEST(SsmStateSlots, Mamba1EqualsFloat64Recurrence) {
  auto m = std::make_shared<Mamba1MixerImpl>(m1_options());
  randomize(*m, 1);
  expect_equals_oracle(m, {{8, 4}, 8, 4}, &m1_oracle);
  expect_decode_continues(m, {{8, 4}, 8, 4}, &m1_oracle);
}

TEST(SsmStateSlots, Mamba2EqualsFloat64Recurrence) {
  auto m = std::make_shared<Mamba2MixerImpl>(m2_options());
  randomize(*m, 2);
  const Layout l{{4, 4, 4}, m2_options().conv_dim(), 4};
  expect_equals_oracle(m, l, &m2_oracle);
  expect_decode_continues(m, l, &m2_oracle);
}

TEST(SsmStateSlots, GradientsEqualFiniteDifferences) {
  auto m1 = std::make_shared<Mamba1MixerImpl>(m1_options());
  randomize(*m1, 3);
  expect_gradients_match_finite_differences(m1, {{8, 4}, 8, 4}, &m1_oracle);
  auto m2 = std::make_shared<Mamba2MixerImpl>(m2_options());
  randomize(*m2, 4);
  expect_gradients_match_finite_differences(m2, {{4, 4, 4}, m2_options().conv_dim(), 4}, &m2_oracle);
}

// A parameter adapter replaces what the mixer computes with: an A_log delta through the slot
// equals a mixer whose A_log holds base + delta.
TEST(SsmParameterSlot, EffectiveTensorIsWhatTheMixerUses) {
  class Delta final : public SsmParameterAdapter {
   public:
    Tensor delta;
    Tensor effective(const std::string& group, const Tensor& base) const override {
      return group == "A_log" ? base + delta : base;
    }
  };
  auto m = std::make_shared<Mamba1MixerImpl>(m1_options());
  randomize(*m, 5);
  auto d = std::make_shared<Delta>();
  d->delta = torch::randn({8, 4}) * 0.3;
  torch::manual_seed(10);
  auto h = torch::randn({2, 7, 12});
  ForwardContext ctx;
  m->set_parameter_adapter(d);
  auto got = m->forward(h, ctx, nullptr).detach();
  m->set_parameter_adapter(nullptr);
  auto before = m->forward(h, ctx, nullptr).detach();
  {
    torch::NoGradGuard ng;
    m->A_log.add_(d->delta);
  }
  auto want = m->forward(h, ctx, nullptr).detach();
  EXPECT_TRUE(torch::equal(got, want));
  EXPECT_FALSE(torch::allclose(before, want));
}
