// The Mamba-1 mixer block (transformers' MambaMixer, FalconMambaMixer and JambaMambaMixer, their
// torch path), on the kernels/ dispatch point.
#include "peftfw/blocks/mamba1_mixer.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/mamba1.hpp"
#include "peftfw/kernels/ops.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::blocks {

namespace ops = peftfw::kernels::mamba1;
namespace F = torch::nn::functional;

Mamba1MixerImpl::Mamba1MixerImpl(Mamba1MixerOptions o) : o_(std::move(o)) {
  const auto opts = nn::param_options();
  const int64_t Di = o_.inner, N = o_.state_size, R = o_.dt_rank;
  TORCH_CHECK(Di > 0 && N > 0 && R > 0 && o_.conv_kernel > 0,
              "Mamba1MixerOptions: inner, state_size, dt_rank and conv_kernel must be positive");
  in_proj = add("in_proj", nn::Linear(o_.hidden_size, 2 * Di, o_.proj_bias), linear("mamba.in_proj"));
  conv1d = add("conv1d",
               Weights(std::vector<int64_t>{Di, 1, o_.conv_kernel},
                       o_.conv_bias ? std::vector<int64_t>{Di} : std::vector<int64_t>{}),
               ssm_conv1d("mamba.conv1d"));
  x_proj = add("x_proj", nn::Linear(Di, R + 2 * N, false), linear("mamba.x_proj"));
  dt_proj = add("dt_proj", nn::Linear(R, Di, true), linear("mamba.dt_proj"));
  dt_proj->set_bias_after_product(true);  // transformers: dt_proj.weight @ dt, then + bias
  set_parameter_group("dt_proj.bias", "dt_bias");  // Mamba-1's time-step bias lives in dt_proj
  // Placeholders: checkpoints (or HybridLM::init_random, by SSM group) give the values.
  A_log = add_parameter("A_log", torch::zeros({Di, N}, opts), "A_log");
  D = add_parameter("D", torch::ones({Di}, opts), "D");
  out_proj = add("out_proj", nn::Linear(Di, o_.hidden_size, o_.proj_bias), linear("mamba.out_proj"));
  // transformers feeds out_proj a transposed (strided) input, for which torch's linear multiplies,
  // rounds, then adds the bias.
  out_proj->set_bias_after_product(true);
  if (o_.dt_bc_norm == Mamba1MixerOptions::DtBcNorm::Weighted) {
    dt_layernorm = add("dt_layernorm", RMSNorm(R, o_.dt_bc_norm_eps), norm("mamba.dt_norm"));
    b_layernorm = add("b_layernorm", RMSNorm(N, o_.dt_bc_norm_eps), norm("mamba.b_norm"));
    c_layernorm = add("c_layernorm", RMSNorm(N, o_.dt_bc_norm_eps), norm("mamba.c_norm"));
  }
}

torch::Tensor Mamba1MixerImpl::dt_bc_norm(RMSNorm& n, const torch::Tensor& x) const {
  switch (o_.dt_bc_norm) {
    case Mamba1MixerOptions::DtBcNorm::None: return x;
    case Mamba1MixerOptions::DtBcNorm::Weighted: return n(x);
    case Mamba1MixerOptions::DtBcNorm::Weightless: {
      // Falcon-Mamba's weightless RMSNorm: float32 math, rounded back to x's dtype.
      auto f = x.to(torch::kFloat32);
      return (f * torch::rsqrt(f.pow(2).mean(-1, true) + o_.dt_bc_norm_eps)).to(x.scalar_type());
    }
  }
  return x;
}

SsmStateLayout Mamba1MixerImpl::state_layout() const {
  return {{o_.inner, o_.state_size}, {"channel", "state"}, o_.inner, o_.conv_kernel};
}

std::vector<std::string> Mamba1MixerImpl::axes_of(const std::string& path) const {
  if (path == "A_log") return {"channel", "state"};
  if (path == "D" || path == "dt_proj.bias") return {"channel"};
  return {};
}

torch::Tensor Mamba1MixerImpl::forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache) {
  const int64_t Bsz = h.size(0), T = h.size(1), N = o_.state_size, R = o_.dt_rank, K = o_.conv_kernel;
  auto xz = in_proj(mask_padding_states(h, ctx.ssm_mask)).chunk(2, -1);  // [x | z]
  auto x = xz[0], z = xz[1];
  // Co-trained SSM tensors are float32 master copies even in a bf16 model: compute in h's dtype.
  auto conv_w = conv1d->weight.squeeze(1).to(h.scalar_type());  // [Di,K]
  auto conv_b = conv1d->bias.defined() ? conv1d->bias.to(h.scalar_type()) : torch::Tensor();
  const auto a_log = slot("A_log", A_log);
  const auto d_skip = slot("D", D);
  const auto terms = state_terms();
  // x_proj -> [dt | B | C], the optional norms, dt_proj (with its bias) -> delta.
  auto ssm_inputs = [&](const torch::Tensor& u) {
    auto parts = x_proj(u).split_with_sizes({R, N, N}, -1);
    auto delta = dt_proj(dt_bc_norm(dt_layernorm, parts[0]));
    return std::make_tuple(delta, dt_bc_norm(b_layernorm, parts[1]), dt_bc_norm(c_layernorm, parts[2]));
  };
  // What learned offsets add to y, inside the gate: silu(z) * (C . state_offset + output_offset)
  // ([..,N] x [Di,N] -> [..,Di]).
  const bool offsets = terms.state_offset.defined() || terms.output_offset.defined();
  auto offset_term = [&](const torch::Tensor& Cm, const torch::Tensor& gate_in) {
    torch::Tensor sum;
    if (terms.state_offset.defined())
      sum = torch::matmul(Cm.to(torch::kFloat32), terms.state_offset.to(torch::kFloat32).t());
    if (terms.output_offset.defined()) {
      auto b = terms.output_offset.to(torch::kFloat32);
      sum = sum.defined() ? sum + b : b;
    }
    return sum * F::silu(gate_in.to(torch::kFloat32));
  };

  torch::Tensor y;  // [B,T,Di] float32
  if (ctx.decode_step) {
    auto u = kernels::causal_conv1d_step(cache->conv_state, x.select(1, 0), conv_w, conv_b, /*silu=*/true);
    auto [delta, Bm, Cm] = ssm_inputs(u);
    ops::StepArgs s;
    s.state = cache->ssm_state;
    s.u = u;
    s.delta = delta;
    s.A_log = a_log;
    s.B = Bm;
    s.C = Cm;
    s.D = d_skip;
    s.z = z.select(1, 0);
    y = ops::selective_scan_step(s);
    if (offsets) y = y + offset_term(Cm, s.z);
    y = y.unsqueeze(1);
    cache->ssm_state = s.state;
  } else {
    // Learned initial state or conv window: where each sequence starts.
    const auto [by_linearity, starts] = state_term_context(terms, Bsz, T, ctx.seq_ids, ctx.ssm_mask, h.device());
    auto u = mask_padding_states(conv_silu_with_terms(x, conv_w, conv_b, ctx.seq_ids, terms, starts), ctx.ssm_mask);
    auto [delta, Bm, Cm] = ssm_inputs(u);
    ops::ScanArgs s;
    s.u = u;
    s.delta = delta;
    s.A_log = a_log;
    s.B = Bm;
    s.C = Cm;
    s.D = d_skip;
    s.z = z;
    s.seq_ids = ctx.seq_ids;
    // One unpadded sequence per row: the scan starts from the learned state itself. Otherwise
    // the state is linear in what it starts from, so each sequence's share of a learned h0 is
    // C_t . (h0 * exp(A * sum of dt since its start)), added to y (initial_readout below).
    if (terms.initial_state.defined() && !by_linearity)
      s.initial_state = terms.initial_state.to(torch::kFloat32).expand({Bsz, o_.inner, N}).contiguous();
    auto res = ops::selective_scan(s);
    y = res.y;
    torch::Tensor carried;  // [B,T,Di,N]: exp(A * dt sums), the decay of h0 up to each token
    if (terms.initial_state.defined() && by_linearity) {
      auto dt = F::softplus(delta).to(torch::kFloat32);  // the scan's dt (rounded to delta's dtype)
      auto A = -torch::exp(a_log.to(torch::kFloat32));    // [Di,N]
      carried = torch::exp(A * sequence_dt_sums(dt, starts).unsqueeze(-1));
      auto h0 = terms.initial_state.to(torch::kFloat32);
      auto readout = (carried * h0 * Cm.to(torch::kFloat32).unsqueeze(2)).sum(-1);
      y = y + readout * F::silu(z.to(torch::kFloat32));
    }
    if (offsets) y = y + offset_term(Cm, z);
    if (cache) {
      // Prefill: keep the last K conv inputs (left-padded) and the final state.
      auto xt = x.transpose(1, 2);  // [B,Di,T]
      if (terms.initial_conv.defined())
        cache->conv_state = conv_cache_with_window(x, terms.initial_conv, starts, K);
      else
        cache->conv_state = T >= K ? xt.narrow(2, T - K, K).contiguous() : F::pad(xt, F::PadFuncOptions({K - T, 0}));
      cache->ssm_state = res.final_state;
      if (carried.defined())
        cache->ssm_state = cache->ssm_state + carried.select(1, T - 1) * terms.initial_state.to(torch::kFloat32) *
                                                  starts.started.select(1, T - 1).to(torch::kFloat32).view({Bsz, 1, 1});
    }
  }
  return out_proj(y.to(h.scalar_type()));
}

}  // namespace peftfw::blocks
