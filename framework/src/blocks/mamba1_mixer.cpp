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

torch::Tensor Mamba1MixerImpl::forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache* cache) {
  const int64_t T = h.size(1), N = o_.state_size, R = o_.dt_rank, K = o_.conv_kernel;
  auto xz = in_proj(mask_padding_states(h, ctx.ssm_mask)).chunk(2, -1);  // [x | z]
  auto x = xz[0], z = xz[1];
  // Co-trained SSM tensors are float32 master copies even in a bf16 model: compute in h's dtype.
  auto conv_w = conv1d->weight.squeeze(1).to(h.scalar_type());  // [Di,K]
  auto conv_b = conv1d->bias.defined() ? conv1d->bias.to(h.scalar_type()) : torch::Tensor();
  // x_proj -> [dt | B | C], the optional norms, dt_proj (with its bias) -> delta.
  auto ssm_inputs = [&](const torch::Tensor& u) {
    auto parts = x_proj(u).split_with_sizes({R, N, N}, -1);
    auto delta = dt_proj(dt_bc_norm(dt_layernorm, parts[0]));
    return std::make_tuple(delta, dt_bc_norm(b_layernorm, parts[1]), dt_bc_norm(c_layernorm, parts[2]));
  };

  torch::Tensor y;  // [B,T,Di] float32
  if (ctx.decode_step) {
    auto u = kernels::causal_conv1d_step(cache->conv_state, x.select(1, 0), conv_w, conv_b, /*silu=*/true);
    auto [delta, Bm, Cm] = ssm_inputs(u);
    ops::StepArgs s;
    s.state = cache->ssm_state;
    s.u = u;
    s.delta = delta;
    s.A_log = A_log;
    s.B = Bm;
    s.C = Cm;
    s.D = D;
    s.z = z.select(1, 0);
    y = ops::selective_scan_step(s).unsqueeze(1);
    cache->ssm_state = s.state;
  } else {
    auto u = mask_padding_states(kernels::causal_conv1d(x, conv_w, conv_b, ctx.seq_ids, /*silu=*/true), ctx.ssm_mask);
    auto [delta, Bm, Cm] = ssm_inputs(u);
    ops::ScanArgs s;
    s.u = u;
    s.delta = delta;
    s.A_log = A_log;
    s.B = Bm;
    s.C = Cm;
    s.D = D;
    s.z = z;
    s.seq_ids = ctx.seq_ids;
    auto res = ops::selective_scan(s);
    y = res.y;
    if (cache) {
      // Prefill: keep the last K conv inputs (left-padded) and the final state.
      auto xt = x.transpose(1, 2);  // [B,Di,T]
      cache->conv_state = T >= K ? xt.narrow(2, T - K, K).contiguous() : F::pad(xt, F::PadFuncOptions({K - T, 0}));
      cache->ssm_state = res.final_state;
    }
  }
  return out_proj(y.to(h.scalar_type()));
}

}  // namespace peftfw::blocks
