// The Mamba-2 mixer of GraniteMoeHybrid (transformers' GraniteMoeHybridMambaLayer,
// torch_forward path), built on the kernels/ dispatch point so CUDA kernels
// replace the reference ops without touching this file.
#include "model.hpp"
#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::granite {

namespace ops = peftfw::kernels::mamba2;
using torch::indexing::Slice;

MambaMixerImpl::MambaMixerImpl(const GraniteConfig& c) : c_(c) {
  in_proj = register_module("in_proj", nn::Linear(c.hidden_size, c.in_proj_out(), c.mamba_proj_bias));
  conv1d = register_module(
      "conv1d", Weights(std::vector<int64_t>{c.conv_dim(), 1, c.mamba_conv_kernel},
                        c.mamba_conv_bias ? std::vector<int64_t>{c.conv_dim()} : std::vector<int64_t>{}));
  dt_bias = register_parameter("dt_bias", torch::ones({c.mamba_heads}));
  A_log = register_parameter("A_log", torch::zeros({c.mamba_heads}));
  D = register_parameter("D", torch::ones({c.mamba_heads}));
  norm = register_module("norm", Weights(std::vector<int64_t>{c.mamba_inner()}));
  out_proj = register_module("out_proj", nn::Linear(c.mamba_inner(), c.hidden_size, c.mamba_proj_bias));
}

namespace {
// transformers' apply_mask_to_padding_states; `mask` is only defined when it applies.
torch::Tensor mask_padding(const torch::Tensor& h, const torch::Tensor& mask) {
  return mask.defined() ? (h * mask.unsqueeze(-1)).to(h.scalar_type()) : h;
}
}  // namespace

torch::Tensor MambaMixerImpl::forward(const torch::Tensor& h, const ForwardContext& ctx,
                                      LayerCache* cache, bool decode_step) {
  const int64_t B = h.size(0), T = h.size(1);
  const int64_t Im = c_.mamba_inner(), CD = c_.conv_dim(), H = c_.mamba_heads,
                P = c_.mamba_head_dim, G = c_.mamba_groups, N = c_.mamba_state,
                K = c_.mamba_conv_kernel;
  auto proj = in_proj(mask_padding(h, ctx.mamba_mask));  // [B,T, Im + CD + H]
  // One split node (its backward writes the three gradients into one buffer), not three
  // narrows (each of whose backwards would zero-fill and add a full-width buffer).
  auto parts = proj.split_with_sizes({Im, CD, H}, -1);
  auto z = parts[0];
  auto xBC = parts[1];
  auto dt = parts[2];
  // Co-trained SSM tensors are float32 master copies even in a bf16 model: compute in h's dtype.
  auto conv_w = conv1d->weight.squeeze(1).to(h.scalar_type());  // [CD,K]
  auto conv_b = conv1d->bias.defined() ? conv1d->bias.to(h.scalar_type()) : torch::Tensor();

  torch::Tensor y;  // [B,T,Im] float32
  if (decode_step) {
    // One token with cached conv and SSM state (transformers' cached branch).
    auto xBC_t = ops::causal_conv1d_step(cache->conv_state, xBC.select(1, 0), conv_w,
                                         conv_b, /*silu=*/true);
    ops::SsdStepArgs s;
    s.state = cache->ssm_state;
    s.x = xBC_t.narrow(-1, 0, Im).reshape({B, H, P});
    s.B = xBC_t.narrow(-1, Im, G * N).reshape({B, G, N});
    s.C = xBC_t.narrow(-1, Im + G * N, G * N).reshape({B, G, N});
    s.dt = dt.select(1, 0);
    s.A_log = A_log;
    s.D = D;
    s.dt_bias = dt_bias;
    s.dt_min = c_.time_step_min;
    s.dt_max = c_.time_step_max;
    y = ops::ssd_step(s).reshape({B, 1, Im});
    cache->ssm_state = s.state;
  } else {
    auto xBC_act = ops::causal_conv1d(xBC, conv_w, conv_b, ctx.seq_ids, /*silu=*/true);
    xBC_act = mask_padding(xBC_act, ctx.mamba_mask);
    auto xs = xBC_act.split_with_sizes({Im, G * N, G * N}, -1);
    ops::SsdArgs s;
    s.x = xs[0].reshape({B, T, H, P});
    s.B = xs[1].reshape({B, T, G, N});
    s.C = xs[2].reshape({B, T, G, N});
    s.dt = dt;
    s.A_log = A_log;
    s.D = D;
    s.dt_bias = dt_bias;
    s.dt_min = c_.time_step_min;
    s.dt_max = c_.time_step_max;
    s.chunk_size = c_.mamba_chunk_size;
    s.seq_ids = ctx.seq_ids;
    auto res = ops::ssd_chunk_scan(s);
    y = res.y.reshape({B, T, Im});
    if (cache) {
      // Prefill: keep the last K raw conv inputs (left-padded) and the final state.
      auto xt = xBC.transpose(1, 2);  // [B,CD,T]
      cache->conv_state =
          T >= K ? xt.narrow(2, T - K, K).contiguous()
                 : torch::nn::functional::pad(xt, torch::nn::functional::PadFuncOptions({K - T, 0}));
      cache->ssm_state = res.final_state;
    }
  }
  // y is float32: the norm's float32 result is rounded to h's dtype once, in the kernel.
  auto n = ops::gated_rms_norm(y, z, norm->weight, c_.rms_norm_eps, h.scalar_type());
  return out_proj(n);
}

}  // namespace peftfw::granite
