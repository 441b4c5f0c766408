// The Mamba-2 mixer block (the torch path of transformers' Mamba2Mixer and its hybrid
// copies), on the kernels/ dispatch point.
#include "peftfw/blocks/mamba2_mixer.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/ops.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::blocks {

namespace ops = peftfw::kernels::mamba2;
namespace F = torch::nn::functional;

std::vector<std::string> mamba2_ssm_group_names() { return {"A_log", "D", "dt_bias", "conv1d"}; }

Mamba2MixerImpl::Mamba2MixerImpl(Mamba2MixerOptions o) : o_(std::move(o)) {
  const auto opts = nn::param_options();
  in_proj = add("in_proj", nn::Linear(o_.hidden_size, o_.in_proj_out(), o_.proj_bias),
                linear("mamba.in_proj"));
  conv1d = add("conv1d",
               Weights(std::vector<int64_t>{o_.conv_dim(), 1, o_.conv_kernel},
                       o_.conv_bias ? std::vector<int64_t>{o_.conv_dim()} : std::vector<int64_t>{}),
               ssm_conv1d("mamba.conv1d"));
  dt_bias = add_parameter("dt_bias", torch::ones({o_.num_heads}, opts), "dt_bias");
  A_log = add_parameter("A_log", torch::zeros({o_.num_heads}, opts), "A_log");
  D = add_parameter("D", torch::ones({o_.num_heads}, opts), "D");
  if (o_.gated_norm) norm = add("norm", Weights(std::vector<int64_t>{o_.inner()}), blocks::norm("mamba.norm"));
  out_proj = add("out_proj", nn::Linear(o_.d_mlp + o_.inner(), o_.hidden_size, o_.out_proj_bias.value_or(o_.proj_bias)),
                 linear("mamba.out_proj"));
  TORCH_CHECK(o_.in_proj_multipliers.empty() || (o_.in_proj_multipliers.size() == 5 && o_.d_mlp == 0),
              "Mamba2MixerOptions::in_proj_multipliers: 5 values [z, x, B, C, dt], without d_mlp");
}

torch::Tensor Mamba2MixerImpl::scale_projection(const torch::Tensor& proj) const {
  if (o_.in_proj_multipliers.empty()) return proj;
  const int64_t GN = o_.n_groups * o_.state_size;
  const std::vector<int64_t> sizes = {o_.inner(), o_.inner(), GN, GN, o_.num_heads};
  std::vector<torch::Tensor> parts;
  for (size_t s = 0; s < sizes.size(); ++s)
    parts.push_back(torch::full({sizes[s]}, o_.in_proj_multipliers[s], proj.options()));
  return proj * torch::cat(parts);
}

torch::Tensor Mamba2MixerImpl::gated_norm(const torch::Tensor& y, const torch::Tensor& z,
                                          torch::Dtype out) const {
  // No norm: y (float32) times silu(z) in z's dtype, as Falcon-H1 computes it.
  if (!o_.gated_norm) return (y * F::silu(z)).to(out);
  if (o_.norm_group_size == 0 && !o_.norm_before_gate)
    return kernels::gated_rms_norm(y, z, norm->weight, o_.norm_eps, out);
  // Grouped or norm-before-gate (mamba_ssm's RMSNormGated): plain LibTorch ops.
  const int64_t g = o_.norm_group_size == 0 ? y.size(-1) : o_.norm_group_size;
  auto x = y.to(torch::kFloat32);
  auto gate = F::silu(z.to(torch::kFloat32));
  if (!o_.norm_before_gate) x = x * gate;
  auto sizes = x.sizes().vec();
  auto grouped = x.reshape({-1, x.size(-1) / g, g});
  grouped = grouped * torch::rsqrt(grouped.pow(2).mean(-1, true) + o_.norm_eps);
  x = grouped.reshape(sizes) * norm->weight.to(torch::kFloat32);
  if (o_.norm_before_gate) x = x * gate;
  return x.to(out);
}

SsmStateLayout Mamba2MixerImpl::state_layout() const {
  return {{o_.num_heads, o_.head_dim, o_.state_size}, {"head", "head_dim", "state"}, o_.conv_dim(), o_.conv_kernel};
}

torch::Tensor Mamba2MixerImpl::forward(const torch::Tensor& h, const ForwardContext& ctx,
                                       LayerCache* cache) {
  const int64_t B = h.size(0), T = h.size(1);
  const int64_t Im = o_.inner(), CD = o_.conv_dim(), H = o_.num_heads, P = o_.head_dim,
                G = o_.n_groups, N = o_.state_size, K = o_.conv_kernel, Dm = o_.d_mlp;
  auto proj = scale_projection(in_proj(mask_padding_states(h, ctx.ssm_mask)));  // [B,T, 2*Dm + Im + CD + H]
  // One split node (its backward writes the gradients into one buffer), not several narrows.
  std::vector<int64_t> sizes = {Im, CD, H};
  if (Dm > 0) sizes = {Dm, Dm, Im, CD, H};
  auto parts = proj.split_with_sizes(sizes, -1);
  const size_t at = Dm > 0 ? 2 : 0;
  auto z = parts[at];
  auto xBC = parts[at + 1];
  auto dt = parts[at + 2];
  // Co-trained SSM tensors are float32 master copies even in a bf16 model: compute in h's dtype.
  auto conv_w = conv1d->weight.squeeze(1).to(h.scalar_type());  // [CD,K]
  auto conv_b = conv1d->bias.defined() ? conv1d->bias.to(h.scalar_type()) : torch::Tensor();
  const auto a_log = slot("A_log", A_log);
  const auto d_skip = slot("D", D);
  const auto dt_b = slot("dt_bias", dt_bias);
  const auto terms = state_terms();
  // C [..,G,N] per head [..,H,N]: heads h*G/H .. share group g.
  auto per_head = [&](const torch::Tensor& Cg) { return Cg.to(torch::kFloat32).repeat_interleave(H / G, -2); };
  // What learned offsets add to y before the gate: C . state_offset + output_offset
  // ([..,H,N] x [H,P,N] -> [..,H,P]).
  const bool offsets = terms.state_offset.defined() || terms.output_offset.defined();
  auto offset_term = [&](const torch::Tensor& Cg) {
    torch::Tensor sum;
    if (terms.state_offset.defined())
      sum = (per_head(Cg).unsqueeze(-2) * terms.state_offset.to(torch::kFloat32)).sum(-1);
    if (terms.output_offset.defined()) {
      auto b = terms.output_offset.to(torch::kFloat32);
      sum = sum.defined() ? sum + b : b;
    }
    return sum;
  };

  torch::Tensor y;  // [B,T,Im] float32
  if (ctx.decode_step) {
    // One token with cached conv and SSM state (transformers' cached branch).
    auto xBC_t = kernels::causal_conv1d_step(cache->conv_state, xBC.select(1, 0), conv_w, conv_b,
                                             /*silu=*/true);
    ops::SsdStepArgs s;
    s.state = cache->ssm_state;
    s.x = xBC_t.narrow(-1, 0, Im).reshape({B, H, P});
    s.B = xBC_t.narrow(-1, Im, G * N).reshape({B, G, N});
    s.C = xBC_t.narrow(-1, Im + G * N, G * N).reshape({B, G, N});
    s.dt = dt.select(1, 0);
    s.A_log = a_log;
    s.D = d_skip;
    s.dt_bias = dt_b;
    s.dt_min = o_.dt_min;
    s.dt_max = o_.dt_max;
    y = ops::ssd_step(s);
    if (offsets) y = y + offset_term(s.C);
    y = y.reshape({B, 1, Im});
    cache->ssm_state = s.state;
  } else {
    // Learned initial state or conv window: where each sequence starts.
    const auto [by_linearity, starts] = state_term_context(terms, B, T, ctx.seq_ids, ctx.ssm_mask, h.device());
    auto xBC_act = mask_padding_states(conv_silu_with_terms(xBC, conv_w, conv_b, ctx.seq_ids, terms, starts), ctx.ssm_mask);
    auto xs = xBC_act.split_with_sizes({Im, G * N, G * N}, -1);
    ops::SsdArgs s;
    s.x = xs[0].reshape({B, T, H, P});
    s.B = xs[1].reshape({B, T, G, N});
    s.C = xs[2].reshape({B, T, G, N});
    s.dt = dt;
    s.A_log = a_log;
    s.D = d_skip;
    s.dt_bias = dt_b;
    s.dt_min = o_.dt_min;
    s.dt_max = o_.dt_max;
    s.chunk_size = o_.chunk_size;
    s.seq_ids = ctx.seq_ids;
    // One unpadded sequence per row: the scan starts from the learned state; otherwise its share
    // is added by linearity, as in the Mamba-1 mixer (A is per head here).
    if (terms.initial_state.defined() && !by_linearity)
      s.initial_state = terms.initial_state.to(torch::kFloat32).expand({B, H, P, N}).contiguous();
    auto res = ops::ssd_chunk_scan(s);
    auto y4 = res.y;  // [B,T,H,P]
    torch::Tensor carried;  // [B,T,H]: exp(A * dt sums), the decay of h0 up to each token
    if (terms.initial_state.defined() && by_linearity) {
      auto dt_eff = ops::ssd_dt(dt, dt_b, o_.dt_min, o_.dt_max).to(torch::kFloat32);  // [B,T,H]
      auto A = -torch::exp(a_log.to(torch::kFloat32));
      carried = torch::exp(A * sequence_dt_sums(dt_eff, starts));
      auto readout = (per_head(s.C).unsqueeze(-2) * terms.initial_state.to(torch::kFloat32)).sum(-1);  // [B,T,H,P]
      y4 = y4 + readout * carried.unsqueeze(-1);
    }
    if (offsets) y4 = y4 + offset_term(s.C);
    y = y4.reshape({B, T, Im});
    if (cache) {
      // Prefill: keep the last K raw conv inputs (left-padded) and the final state.
      auto xt = xBC.transpose(1, 2);  // [B,CD,T]
      if (terms.initial_conv.defined())
        cache->conv_state = conv_cache_with_window(xBC, terms.initial_conv, starts, K);
      else
        cache->conv_state = T >= K ? xt.narrow(2, T - K, K).contiguous()
                                   : F::pad(xt, F::PadFuncOptions({K - T, 0}));
      cache->ssm_state = res.final_state;
      if (carried.defined())
        cache->ssm_state = cache->ssm_state +
                           (carried.select(1, T - 1) * starts.started.select(1, T - 1).to(torch::kFloat32).view({B, 1}))
                                   .view({B, H, 1, 1}) *
                               terms.initial_state.to(torch::kFloat32);
    }
  }
  // y is float32: the norm's float32 result is rounded to h's dtype once, in the kernel.
  auto n = gated_norm(y, z, h.scalar_type());
  if (Dm > 0) n = torch::cat({F::silu(parts[0]) * parts[1], n}, -1);
  return out_proj(n);
}

}  // namespace peftfw::blocks
